"""Crash safety with real processes: SIGKILL, SIGTERM, a Redis restart and a poison job.

Each test runs its own workers on its own queue, with a short lease (2 s) and visibility
timeout (4 s) so that recovery happens within the test, not after the production defaults.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from tests.support import (
    WorkerProcess,
    celery_worker_args,
    events_so_far,
    make_request,
    streaming,
    terminals,
    wait_for,
    worker_env,
)
from worker import events as ev
from worker.client.sync import Client, Job
from worker.dev.embedded import EmbeddedRedis
from worker.settings import settings_from_env

pytestmark = pytest.mark.integration


def _env(redis_url: str, simulator_url: str, queue: str, **settings: Any) -> dict[str, str]:
    fast = {"lease_ttl_s": 2, "visibility_timeout_s": 4, "concurrency": 100}
    return worker_env(redis_url, simulator_url, queue=queue, **{**fast, **settings})


def _start(env: dict[str, str]) -> WorkerProcess:
    settings = settings_from_env(env)
    return WorkerProcess(
        celery_worker_args(concurrency=settings.concurrency, queue=settings.queue), env
    )


def _kill(worker: WorkerProcess) -> None:
    os.killpg(worker.proc.pid, signal.SIGKILL)  # the worker and any child it has
    worker.proc.wait(timeout=10)


def _events(job: Job) -> list[dict[str, Any]]:
    return list(job.events(timeout=10))


@pytest.fixture
def queue() -> str:
    return f"llmw-crash-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest) -> dict[str, str]:
    """The broker: the results Redis, or RabbitMQ (a node of the suite's own)."""
    if request.param == "redis":
        return {}
    return {"broker_url": request.getfixturevalue("rabbitmq").url}


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def test_sigkill_with_fifty_jobs_streaming_loses_none_and_runs_none_twice(
    redis_url: str,
    simulator_url: str,
    queue: str,
    workers: list[WorkerProcess],
    broker: dict[str, str],
) -> None:
    """A gevent worker killed with 60 jobs streaming: a fresh worker completes every one once
    (on RabbitMQ the killed worker's deliveries come back when its connection drops)."""
    env = _env(redis_url, simulator_url, queue, **broker)
    first = _start(env).ready()
    workers.append(first)
    tag = uuid.uuid4().hex
    with Client(settings_from_env(env)) as client:
        jobs = client.submit_many(
            [make_request(f"crash {tag} {i} [[sim tokens=80 tps=16]]") for i in range(60)]
        )
        # Every job taken by the worker: this test is about jobs in flight (a message on its
        # way from the queue to `unacked` has a test of its own below).
        wait_for(
            lambda: streaming(jobs) >= 55 and all(events_so_far(job) for job in jobs),
            30,
            "55 jobs streaming and all 60 started",
            interval_s=0.2,
        )
        _kill(first)
        second = _start(env)
        workers.append(second)
        try:
            messages = [job.result(timeout=60) for job in jobs]
        except TimeoutError:
            stuck = [(j.job_id, j.status()) for j in jobs if j.status()["state"] != "completed"]
            unacked = client.redis.hlen("unacked")
            mutex = client.redis.get("unacked_mutex")
            raise AssertionError(
                f"{len(stuck)} jobs stuck, unacked={unacked} mutex={mutex!r}: {stuck[:3]}\n"
                f"{second.log()[-3000:]}"
            ) from None
        histories = [_events(job) for job in jobs]
        statuses = [job.status() for job in jobs]
    assert all(m["usage"]["output_tokens"] == 80 for m in messages)
    for events in histories:
        assert terminals(events) == [ev.COMPLETED]
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(1, len(seqs) + 1))
    taken_over = [
        events
        for events in histories
        if any(e["type"] == ev.RETRY and e["reason"] == "worker_lost" for e in events)
    ]
    assert len(taken_over) >= 55
    for events, status in zip(histories, statuses, strict=True):
        # One run by the killed worker, at most one by the second: none ran twice after it.
        started = [e["type"] for e in events].count(ev.STARTED)
        assert started == status["deliveries"] <= 2


def test_a_worker_killed_between_taking_a_message_and_recording_it_loses_nothing(
    redis_url: str, simulator_url: str, queue: str, workers: list[WorkerProcess]
) -> None:
    """kombu alone takes a message with BRPOP and records it in `unacked` with a second command;
    a kill in between lost it. The worker here holds the message it took (a test-only pause),
    so it is in neither place kombu looks when the worker is killed: the inbox gives it back."""
    env = _env(redis_url, simulator_url, queue, concurrency=2)
    first = _start({**env, "LLM_WORKER_TEST_PAUSE_AFTER_FETCH_S": "120"})
    workers.append(first)
    with Client(settings_from_env(env)) as client:
        r = client.redis
        job = client.submit(make_request(f"window {uuid.uuid4().hex} [[sim tokens=3]]"))
        held = wait_for(
            lambda: [i for i in r.smembers("_kombu.inboxes") if queue.encode() in i and r.llen(i)],
            30,
            "the message in the worker's inbox",
        )
        assert r.llen(queue) == 0
        assert not [v for v in r.hvals("unacked") if job.job_id.encode() in v]
        _kill(first)
        workers.append(_start(env))
        assert job.result(timeout=60)["usage"]["output_tokens"] == 3
        assert r.llen(held[0]) == 0
        assert held[0] not in r.smembers("_kombu.inboxes")
        assert job.status()["deliveries"] == 1  # the dead worker never got to claim it


def test_sigterm_lets_streaming_jobs_finish_and_hands_back_a_job_in_backoff(
    redis_url: str,
    simulator_url: str,
    queue: str,
    workers: list[WorkerProcess],
    broker: dict[str, str],
) -> None:
    """Warm shutdown: in-flight streams complete, a job waiting out a 20 s backoff goes back
    to the queue at once (the worker exits long before the backoff ends), and nothing is lost;
    on RabbitMQ as on Redis."""
    env = _env(
        redis_url,
        simulator_url,
        queue,
        concurrency=10,
        backoff_base_s=20,
        backoff_max_s=20,
        shutdown_grace_s=30,
        **broker,
    )
    first = _start(env).ready()
    workers.append(first)
    tag = uuid.uuid4().hex
    with Client(settings_from_env(env)) as client:
        streams = client.submit_many(
            [make_request(f"term {tag} {i} [[sim tokens=40 tps=20]]") for i in range(5)]
        )
        waiting = client.submit(
            make_request(f"backoff {tag} [[sim tokens=3 fault=503 fault_times=1]]")
        )
        wait_for(lambda: streaming(streams) == 5, 30, "5 jobs streaming", interval_s=0.1)
        wait_for(
            lambda: any(e["type"] == ev.RETRY for e in events_so_far(waiting)),
            30,
            "the backoff",
        )
        first.proc.send_signal(signal.SIGTERM)
        first.proc.wait(timeout=30)
        for job in streams:  # finished by the first worker, in one attempt
            events = _events(job)
            assert terminals(events) == [ev.COMPLETED]
            assert [e["type"] for e in events].count(ev.STARTED) == 1
        assert waiting.status()["state"] == "queued"
        # Handed back, not waited out: after the 20 s backoff the first worker would have
        # completed it (the fault hits the first request only) before exiting.
        assert terminals(events_so_far(waiting)) == []
        workers.append(_start(env))
        assert waiting.result(timeout=60)["usage"]["output_tokens"] == 3
        assert terminals(_events(waiting)) == [ev.COMPLETED]


def test_sigterm_hands_back_a_job_in_backoff_under_prefork(
    redis_url: str, simulator_url: str, queue: str, workers: list[WorkerProcess]
) -> None:
    """Prefork children hear of the warm shutdown too: a child waiting out a 20 s backoff
    hands its job back at once instead of holding the shutdown for the whole backoff."""
    env = _env(
        redis_url,
        simulator_url,
        queue,
        pool="prefork",
        concurrency=2,
        backoff_base_s=20,
        backoff_max_s=20,
        metrics_port=0,
    )
    settings = settings_from_env(env)
    first = WorkerProcess(celery_worker_args("prefork", 2, settings.queue), env).ready()
    workers.append(first)
    with Client(settings) as client:
        prompt = f"prefork backoff {uuid.uuid4().hex} [[sim tokens=3 fault=503 fault_times=1]]"
        waiting = client.submit(make_request(prompt))
        wait_for(
            lambda: any(e["type"] == ev.RETRY for e in events_so_far(waiting)), 30, "the backoff"
        )
        first.proc.send_signal(signal.SIGTERM)
        first.proc.wait(timeout=30)
        assert waiting.status()["state"] == "queued"  # handed back, not waited out
        workers.append(_start(env))
        assert waiting.result(timeout=60)["usage"]["output_tokens"] == 3
        assert terminals(_events(waiting)) == [ev.COMPLETED]


def test_sigterm_past_the_grace_hands_a_stalled_stream_back(
    redis_url: str, simulator_url: str, queue: str, workers: list[WorkerProcess]
) -> None:
    """A stream still running when SHUTDOWN_GRACE_S ends is interrupted and handed back; its
    chunks are voided by a retry event and the next worker completes it."""
    env = _env(redis_url, simulator_url, queue, concurrency=5, shutdown_grace_s=1)
    first = _start(env).ready()
    workers.append(first)
    with Client(settings_from_env(env)) as client:
        prompt = f"grace {uuid.uuid4().hex} [[sim tokens=10 fault=stall fault_times=1]]"
        job = client.submit(make_request(prompt))
        wait_for(lambda: streaming([job]) == 1, 30, "the stream")
        first.proc.send_signal(signal.SIGTERM)
        first.proc.wait(timeout=30)
        assert job.status()["state"] == "queued"  # interrupted at the grace, not waited out
        workers.append(_start(env))
        assert job.result(timeout=60)["usage"]["output_tokens"] == 10
        events = _events(job)
    retries = [e for e in events if e["type"] == ev.RETRY]
    assert [r["reason"] for r in retries] == ["worker_shutdown"]
    assert terminals(events) == [ev.COMPLETED]


def test_jobs_complete_once_across_a_redis_restart(
    simulator_url: str, queue: str, workers: list[WorkerProcess]
) -> None:
    """Redis (with AOF) restarted while 30 jobs stream: every job completes, exactly once."""
    with EmbeddedRedis(appendonly=True) as server:
        env = _env(server.url, simulator_url, queue, concurrency=50)
        workers.append(_start(env).ready())
        tag = uuid.uuid4().hex
        with Client(settings_from_env(env)) as client:
            jobs = client.submit_many(
                [make_request(f"restart {tag} {i} [[sim tokens=60 tps=20]]") for i in range(30)]
            )
            wait_for(lambda: streaming(jobs) >= 20, 30, "20 jobs streaming", interval_s=0.2)
            server.restart()
            messages = [job.result(timeout=120) for job in jobs]
            histories = [_events(job) for job in jobs]
        assert all(m["usage"]["output_tokens"] == 60 for m in messages)
        for events in histories:
            assert terminals(events) == [ev.COMPLETED]
        # The worker is still consuming after the restart.
        with Client(settings_from_env(env)) as client:
            client.submit(make_request("after the restart [[sim tokens=2]]")).result(timeout=60)


def test_a_job_that_kills_its_worker_is_dead_lettered_at_the_delivery_limit(
    redis_url: str, simulator_url: str, queue: str, workers: list[WorkerProcess]
) -> None:
    """A job whose worker dies every time it runs it stops after MAX_DELIVERIES deliveries:
    failed with delivery_limit and kept in the dead letters, instead of killing workers forever."""
    env = _env(redis_url, simulator_url, queue, concurrency=5, max_deliveries=2)
    with Client(settings_from_env(env)) as client:
        job_id = f"poison-{uuid.uuid4().hex}"
        job = client.submit(make_request(f"{job_id} [[sim tokens=10 fault=stall]]"), job_id=job_id)
        for delivery in (1, 2):  # each worker dies while it runs the job
            worker = _start(env)
            workers.append(worker)
            wait_for(
                lambda d=delivery: (
                    job.status().get("deliveries") == d  # type: ignore[misc]
                    and streaming([job]) == 1
                    and job.status()["state"] == "running"
                ),
                60,
                f"delivery {delivery}",
            )
            _kill(worker)
        workers.append(_start(env))
        events = _events(job)
        failed = events[-1]
        assert terminals(events) == [ev.FAILED]
        assert failed["error"]["type"] == "delivery_limit"
        dead = [
            {k.decode(): v.decode() for k, v in fields.items()}
            for _id, fields in client.redis.xrange(client.keys.dead_letters)
        ]
        entry = next(d for d in dead if d["job_id"] == job_id)
        assert entry["reason"] == "delivery_limit"
        assert orjson.loads(entry["payload"])["job_id"] == job_id


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_without_mid_stream_retries_a_stream_cut_by_its_worker_fails_instead_of_restarting(
    redis_url: str, simulator_url: str, queue: str, workers: list[WorkerProcess], how: str
) -> None:
    """RETRY_MID_STREAM=false: a stream whose worker died (or shut down past the grace) ends
    the job failed and dead-lettered; no second worker restarts the answer."""
    env = _env(
        redis_url, simulator_url, queue, concurrency=5, retry_mid_stream="false", shutdown_grace_s=1
    )
    first = _start(env).ready()
    workers.append(first)
    with Client(settings_from_env(env)) as client:
        job_id = f"no-restart-{how}-{uuid.uuid4().hex}"
        job = client.submit(make_request(f"{job_id} [[sim tokens=10 fault=stall]]"), job_id=job_id)
        wait_for(lambda: streaming([job]) == 1, 30, "the stream")
        if how == "sigkill":
            _kill(first)
            workers.append(_start(env))
        else:
            first.proc.send_signal(signal.SIGTERM)
            first.proc.wait(timeout=30)
        events = _events(job)
    reason = "worker_lost" if how == "sigkill" else "worker_shutdown"
    assert terminals(events) == [ev.FAILED]
    assert events[-1]["error"]["type"] == reason
    assert [e["type"] for e in events].count(ev.STARTED) == 1
