"""RabbitMQ as the broker, with a node of the suite's own: the outbox (a producer that dies
between the record and the publish, a broker that is down, a resubmit), duplicates absorbed by
the lease, and a RabbitMQ restart while jobs run."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from kombu import Connection

from tests.support import (
    ROOT,
    WorkerProcess,
    celery_worker_args,
    events_so_far,
    free_port,
    make_request,
    streaming,
    terminals,
    wait_for,
    worker_env,
)
from worker import AsyncClient
from worker import events as ev
from worker.broker import amqp_queue
from worker.client.outbox import AmqpPublisher, Outbox, OutboxItem
from worker.client.sync import Client, Job
from worker.dev.rabbitmq import RabbitServer
from worker.settings import Settings, settings_from_env

pytestmark = pytest.mark.integration

#: A broker URL that refuses connections: a producer meeting a broker outage.
DOWN = f"amqp://guest:guest@127.0.0.1:{free_port()}//"


def _history(job: Job) -> list[dict[str, Any]]:
    return list(job.events(timeout=30))


def _ran_once(job: Job) -> None:
    events = _history(job)
    assert terminals(events) == [ev.COMPLETED]
    assert [e["type"] for e in events].count(ev.STARTED) == 1


def _waiting(url: str, queue: str) -> int:
    """Messages ready in one RabbitMQ queue (declared as the workers declare it)."""
    with Connection(url) as conn:
        declared = amqp_queue(queue)(conn.default_channel).queue_declare(passive=True)
        return int(declared.message_count)


@pytest.fixture
def idle_queue(amqp_worker: WorkerProcess) -> str:
    """A queue that no worker consumes (its messages stay where they are put)."""
    return f"llmw-idle-{uuid.uuid4().hex[:8]}"


def _settings(worker: WorkerProcess, **overrides: Any) -> Settings:
    env = {**worker.env, **{f"LLM_WORKER_{k.upper()}": str(v) for k, v in overrides.items()}}
    return settings_from_env(env)


def test_a_producer_killed_between_the_record_and_the_publish_leaves_a_job_the_sweeper_runs(
    amqp_worker: WorkerProcess,
) -> None:
    """A real producer process SIGKILLed after the submit script and before its publish: the
    job is recorded and in the outbox, and the worker's sweeper publishes it (after the
    default grace); it completes once and leaves the outbox."""
    job_id = f"killed-producer-{uuid.uuid4().hex}"
    code = (
        "import os, signal, sys\n"
        "from worker.client.sync import Client\n"
        "from worker.settings import settings_from_env\n"
        "Client._send_elsewhere = lambda self, items: os.kill(os.getpid(), signal.SIGKILL)\n"
        "with Client(settings_from_env(os.environ)) as client:\n"
        f"    client.submit({make_request('orphan [[sim tokens=4]]')!r}, job_id=sys.argv[1])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, job_id], cwd=ROOT, env=amqp_worker.env, timeout=60, check=False
    )
    assert done.returncode == -signal.SIGKILL
    with Client(amqp_worker.settings()) as client:
        job = client.get(job_id)
        # Recorded, never published: only the outbox has it (the sweeper waits 5 s).
        assert job.status()["state"] == "queued"
        assert client.redis.zscore(client.outbox.key, job_id) is not None
        assert job.result(timeout=60)["usage"]["output_tokens"] == 4
        _ran_once(job)
        assert client.redis.zscore(client.outbox.key, job_id) is None
        assert not client.redis.exists(client.keys.outbox_message(job_id))


def test_a_submit_while_the_broker_is_down_succeeds_and_the_sweeper_enqueues_it(
    amqp_worker: WorkerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """With the broker unreachable the submit still returns (the job is recorded and kept in
    the outbox, and the producer logs why without the broker's password); a worker's sweeper
    publishes it and it completes once."""
    settings = _settings(amqp_worker, broker_url=DOWN.replace("guest:guest", "guest:s3cr3t-pw"))
    with Client(settings) as producer:
        job = producer.submit(make_request(f"outage {uuid.uuid4().hex} [[sim tokens=3]]"))
        assert producer.redis.zscore(producer.outbox.key, job.job_id) is not None
    assert any("outbox_publish_deferred" in r.getMessage() for r in caplog.records)
    assert not any("s3cr3t-pw" in r.getMessage() for r in caplog.records)
    with Client(amqp_worker.settings()) as client:
        handle = client.get(job.job_id)
        assert handle.result(timeout=60)["usage"]["output_tokens"] == 3
        _ran_once(handle)
        assert client.redis.zscore(client.outbox.key, job.job_id) is None


def test_a_resubmit_of_an_unconfirmed_id_publishes_it_and_of_a_confirmed_one_does_not(
    amqp_worker: WorkerProcess, rabbitmq: RabbitServer, idle_queue: str
) -> None:
    """The first submit could not reach the broker; submitting the same id again publishes the
    kept message (one on the queue, the outbox empty); a third submit publishes nothing."""
    request = make_request(f"resubmit {uuid.uuid4().hex}")
    job_id = f"resubmit-{uuid.uuid4().hex}"
    with Client(_settings(amqp_worker, broker_url=DOWN, queue=idle_queue)) as down:
        down.submit(request, job_id=job_id)
        assert down.redis.zscore(down.outbox.key, job_id) is not None
    with Client(_settings(amqp_worker, queue=idle_queue)) as client:
        assert client.submit(request, job_id=job_id).job_id == job_id
        assert client.redis.zscore(client.outbox.key, job_id) is None
        assert _waiting(rabbitmq.url, idle_queue) == 1
        client.submit(request, job_id=job_id)
        assert _waiting(rabbitmq.url, idle_queue) == 1
        assert client.get(job_id).status()["state"] == "queued"


def test_the_async_client_publishes_through_the_outbox(amqp_worker: WorkerProcess) -> None:
    """AsyncClient on AMQP: the job completes and nothing is left in the outbox."""

    async def main() -> tuple[dict[str, Any], int]:
        async with AsyncClient(amqp_worker.settings()) as client:
            job = await client.submit(make_request(f"async {uuid.uuid4().hex} [[sim tokens=2]]"))
            message = await job.result(timeout=30)
            pending = await client.redis.zcard(client.keys.outbox(client.settings.queue))
            return message, int(pending)

    message, pending = asyncio.run(main())
    assert message["usage"]["output_tokens"] == 2
    assert pending == 0


def test_a_message_published_twice_runs_its_job_once(
    amqp_worker: WorkerProcess, rabbitmq: RabbitServer
) -> None:
    """Copies of a job's message published while it runs and after it ended (what a slow
    producer and the sweeper can both do) meet its lease and its end: one run, one end."""
    settings = amqp_worker.settings()
    publisher = AmqpPublisher(rabbitmq.url, settings.queue)
    request = make_request(f"twice {uuid.uuid4().hex} [[sim tokens=30 tps=30]]")
    try:
        with Client(settings) as client:
            job = client.submit(request)
            wait_for(lambda: streaming([job]) == 1, 30, "the stream")
            copy = OutboxItem(job.job_id, {"job_id": job.job_id, "request": request})
            assert publisher.publish([copy]) == ([job.job_id], None)
            job.result(timeout=60)
            assert publisher.publish([copy]) == ([job.job_id], None)
            wait_for(lambda: _waiting(rabbitmq.url, settings.queue) == 0, 30, "the copies taken")
            # Both copies were delivered and claimed; neither started the job again.
            _ran_once(job)
            assert job.status()["deliveries"] == 1
    finally:
        publisher.close()


def test_only_one_worker_sweeps_an_outbox_per_tick(redis_url: str) -> None:
    """Two sweepers asking in the same tick: the first gets the due jobs, the second nothing,
    and a job is handed out again only after another grace."""
    import redis

    from worker.keys import Keys

    client = redis.Redis.from_url(redis_url)
    keys = Keys(f"t{uuid.uuid4().hex[:6]}")
    outbox = Outbox(client, keys, "q")
    client.zadd(outbox.key, {"a": 1.0, "b": 2.0})
    try:
        assert sorted(outbox.due(grace_s=1, lock_ttl_s=30)) == ["a", "b"]
        assert outbox.due(grace_s=1, lock_ttl_s=30) == []  # the lock is taken
        client.delete(keys.outbox_lock("q"))
        assert outbox.due(grace_s=60, lock_ttl_s=30) == []  # bumped: not due again yet
    finally:
        client.delete(outbox.key, keys.outbox_lock("q"))
        client.close()


# -- RabbitMQ restarted while jobs run ----------------------------------------------------


@pytest.fixture
def own_rabbit(tmp_path: Any, rabbitmq: RabbitServer) -> Iterator[RabbitServer]:
    """A node for one test (to restart it without disturbing the session's)."""
    server = RabbitServer(tmp_path / "rabbit").start()
    try:
        yield server
    finally:
        server.stop()


def test_jobs_end_once_across_a_rabbitmq_restart(
    redis_url: str, simulator_url: str, own_rabbit: RabbitServer
) -> None:
    """RabbitMQ stopped and started while 30 jobs stream (for longer than the restart takes)
    and 20 wait on the queue, with 5 jobs submitted during the outage: the running jobs' copies
    come back and wait behind their leases, the outage's jobs go out through the outbox, every
    job completes exactly once, and the worker consumes again afterwards."""
    queue = f"llmw-restart-{uuid.uuid4().hex[:8]}"
    env = worker_env(
        redis_url,
        simulator_url,
        broker_url=own_rabbit.url,
        queue=queue,
        concurrency=30,
        lease_ttl_s=2,
        outbox_grace_s=1,
    )
    worker = WorkerProcess(celery_worker_args(concurrency=30, queue=queue), env).ready()
    try:
        tag = uuid.uuid4().hex
        with Client(settings_from_env(env)) as client:
            jobs = client.submit_many(
                [make_request(f"rmq {tag} {i} [[sim tokens=150 tps=10]]") for i in range(50)]
            )
            wait_for(lambda: streaming(jobs) >= 25, 30, "25 jobs streaming", interval_s=0.2)
            own_rabbit.stop()
            during = client.submit_many(
                [make_request(f"rmq down {tag} {i} [[sim tokens=3]]") for i in range(5)]
            )
            own_rabbit.start()
            everything = jobs + during
            try:
                for job in everything:
                    job.result(timeout=120)
            except TimeoutError:
                states = [job.status()["state"] for job in everything]
                raise AssertionError(f"{states}\n{worker.log()[-4000:]}") from None
            for job in everything:
                events = events_so_far(job)
                assert terminals(events) == [ev.COMPLETED], [e["type"] for e in events]
                # Redelivered after the restart, never run again: the lease held meanwhile.
                assert [e["type"] for e in events].count(ev.STARTED) == 1
            assert client.outbox.size() == 0
            after = client.submit(make_request("after the restart [[sim tokens=2]]"))
            assert after.result(timeout=60)["usage"]["output_tokens"] == 2
    finally:
        worker.stop()


def test_priorities_land_in_their_bands_and_the_worker_takes_every_band(
    amqp_worker: WorkerProcess, rabbitmq: RabbitServer, idle_queue: str
) -> None:
    """Priority 9 goes to the high band, 5 to the queue, 0 to the low band (a queue nobody
    consumes holds one in each); a worker consumes all three bands of its queue."""
    tag = uuid.uuid4().hex
    with Client(_settings(amqp_worker, queue=idle_queue)) as idle:
        for priority in (9, 5, 0):
            idle.submit(make_request(f"band {tag} {priority}"), priority=priority)
        assert [
            _waiting(rabbitmq.url, name)
            for name in (f"{idle_queue}.high", idle_queue, f"{idle_queue}.low")
        ] == [1, 1, 1]
    with Client(amqp_worker.settings()) as client:
        jobs = [
            client.submit(make_request(f"run {tag} {p} [[sim tokens=2]]"), priority=p)
            for p in (9, 5, 0)
        ]
        assert [job.result(timeout=30)["usage"]["output_tokens"] for job in jobs] == [2, 2, 2]
        assert [job.status()["priority"] for job in jobs] == [9, 5, 0]


def test_a_high_priority_job_does_not_wait_behind_the_normal_backlog(
    redis_url: str, simulator_url: str, rabbitmq: RabbitServer
) -> None:
    """One worker slot, ten normal jobs queued, then one of priority 9: the high one runs as
    soon as the slot frees, before the rest of the normal band's backlog."""
    queue = f"llmw-bands-{uuid.uuid4().hex[:8]}"
    env = worker_env(redis_url, simulator_url, broker_url=rabbitmq.url, queue=queue, concurrency=1)
    worker = WorkerProcess(celery_worker_args(concurrency=1, queue=queue), env).ready()
    try:
        tag = uuid.uuid4().hex
        with Client(settings_from_env(env)) as client:
            normal = client.submit_many(
                [make_request(f"backlog {tag} {i} [[sim tokens=10 tps=40]]") for i in range(10)]
            )
            wait_for(lambda: events_so_far(normal[0]), 30, "the first normal job")
            high = client.submit(make_request(f"urgent {tag} [[sim tokens=2]]"), priority=9)
            high.result(timeout=60)
            for job in normal:
                job.result(timeout=60)
            high_start = high.status()["started_at"]
            started_before = [job for job in normal if job.status()["started_at"] < high_start]
            # The job running when it arrived, and at most one the worker held for the slot.
            assert 1 <= len(started_before) <= 2
    finally:
        worker.stop()


def test_a_second_redis_as_broker_goes_through_the_outbox_too(
    redis_url: str, simulator_url: str
) -> None:
    """A Redis broker apart from the results Redis (here another database): a job submitted
    while that broker is unreachable is kept in the outbox and the sweeper enqueues it; a
    normal submit leaves nothing behind."""
    broker = redis_url.rsplit("/", 1)[0] + "/1"
    queue = f"llmw-second-{uuid.uuid4().hex[:8]}"
    env = worker_env(redis_url, simulator_url, broker_url=broker, queue=queue, outbox_grace_s=1)
    worker = WorkerProcess(celery_worker_args(concurrency=10, queue=queue), env).ready()
    try:
        down = {**env, "LLM_WORKER_BROKER_URL": f"redis://127.0.0.1:{free_port()}/1"}
        tag = uuid.uuid4().hex
        with Client(settings_from_env(down)) as producer:
            deferred = producer.submit(make_request(f"second down {tag} [[sim tokens=2]]"))
        with Client(settings_from_env(env)) as client:
            normal = client.submit(make_request(f"second {tag} [[sim tokens=3]]"))
            assert normal.result(timeout=30)["usage"]["output_tokens"] == 3
            handle = client.get(deferred.job_id)
            assert handle.result(timeout=30)["usage"]["output_tokens"] == 2
            _ran_once(handle)
            assert client.outbox.size() == 0
    finally:
        worker.stop()


def test_a_job_postponed_by_the_rate_limiter_comes_back_through_the_broker(
    redis_url: str, simulator_url: str, rabbitmq: RabbitServer
) -> None:
    """Past RATE_LIMIT_MAX_WAIT_S a job goes back with a countdown, which on RabbitMQ travels
    through Celery's delayed-delivery queues rather than a worker's memory; it completes once,
    a period later, and the postponement cost no attempt."""
    limit_key = f"amqp-slow-{uuid.uuid4().hex[:8]}"
    queue = f"llmw-later-{uuid.uuid4().hex[:8]}"
    env = worker_env(
        redis_url,
        simulator_url,
        broker_url=rabbitmq.url,
        queue=queue,
        rate_limits=orjson.dumps({limit_key: {"rpm": 1}}).decode(),
        rate_limit_period_s=3,
        rate_limit_burst_s=0,
        rate_limit_max_wait_s=0.5,
    )
    worker = WorkerProcess(celery_worker_args(concurrency=5, queue=queue), env).ready()
    try:
        request = make_request(f"later {uuid.uuid4().hex} [[sim tokens=2]]")
        with Client(settings_from_env(env)) as client:
            jobs = client.submit_many([request, request], metadata={"limit_key": limit_key})
            for job in jobs:
                job.result(timeout=60)
            histories = [_history(job) for job in jobs]
            assert [job.status()["attempts"] for job in jobs] == [1, 1]
        postponed = [h for h in histories if any(e["type"] == ev.RETRY for e in h)]
        assert len(postponed) == 1
        retry = next(e for e in postponed[0] if e["type"] == ev.RETRY)
        assert retry["reason"] == "rate_limited"
        for events in histories:
            assert terminals(events) == [ev.COMPLETED]
        assert "Direct exchanges are not supported" not in worker.log()
    finally:
        worker.stop()


def test_llm_worker_run_on_amqp_is_healthy_and_reports_its_outbox(
    redis_url: str, simulator_url: str, rabbitmq: RabbitServer
) -> None:
    """`llm-worker run` on AMQP: the Redis-only parts (our transport, the visibility refresh,
    the queue-depth scrape) stay out of the way; it consumes every band, /healthz and /readyz
    answer 200, and /metrics carries the outbox gauge of its queue."""
    queue = f"llmw-run-{uuid.uuid4().hex[:8]}"
    env = worker_env(redis_url, simulator_url, broker_url=rabbitmq.url, queue=queue)
    args = [sys.executable, "-m", "worker.cli", "run", "--pool", "gevent", "--concurrency", "20"]
    args += ["--processes", "1"]  # one process: /healthz at once after the canary
    worker = WorkerProcess(args, env).ready()
    try:
        with Client(settings_from_env(env)) as client:
            job = client.submit(
                make_request(f"run {uuid.uuid4().hex} [[sim tokens=2]]"), priority=8
            )
            assert job.result(timeout=30)["usage"]["output_tokens"] == 2
        assert worker.http_get("/healthz").status_code == 200
        assert worker.http_get("/readyz").status_code == 200
        metrics = worker.http_get("/metrics").text
        assert f'llm_worker_outbox_pending{{queue="{queue}"}} 0.0' in metrics
        assert "Traceback" not in worker.log()
    finally:
        worker.stop()


def test_a_batch_larger_than_the_confirm_window_is_confirmed_whole(
    rabbitmq: RabbitServer, idle_queue: str
) -> None:
    """2,500 messages (two and a half confirmation windows) in one publish: each is confirmed
    once, in order, and all are on the queue."""
    publisher = AmqpPublisher(rabbitmq.url, idle_queue)
    items = [
        OutboxItem(f"window-{i}", {"job_id": f"window-{i}", "request": {}}, priority=5)
        for i in range(2500)
    ]
    try:
        confirmed, error = publisher.publish(items)
        assert error is None
        assert confirmed == [item.job_id for item in items]
        assert _waiting(rabbitmq.url, idle_queue) == 2500
    finally:
        publisher.close()
        with Connection(rabbitmq.url) as conn:
            amqp_queue(idle_queue)(conn.default_channel).delete()


def test_the_async_client_defers_to_the_outbox_while_the_broker_is_down(
    amqp_worker: WorkerProcess,
) -> None:
    """AsyncClient (the gateway's) with the broker unreachable: submit returns, the job waits
    in the outbox, and a worker's sweeper enqueues it; it completes once."""
    settings = _settings(amqp_worker, broker_url=DOWN)

    async def submit() -> str:
        async with AsyncClient(settings) as client:
            job = await client.submit(
                make_request(f"async down {uuid.uuid4().hex} [[sim tokens=2]]")
            )
            assert await client.redis.zscore(client.keys.outbox(settings.queue), job.job_id)
            return job.job_id

    job_id = asyncio.run(submit())
    with Client(amqp_worker.settings()) as client:
        job = client.get(job_id)
        assert job.result(timeout=60)["usage"]["output_tokens"] == 2
        _ran_once(job)
