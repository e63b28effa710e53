"""Redis under Sentinel, with real servers: a master, a replica and three Sentinels on loopback
(``worker.dev.sentinel``), the master SIGKILLed while a worker streams and a producer submits."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
from worker import AsyncClient
from worker import events as ev
from worker.client.sync import Client, Job
from worker.connections.clients import RedisClusterUnsupported, ReplicationShort
from worker.dev.embedded import EmbeddedRedis, free_port
from worker.dev.sentinel import SentinelGroup
from worker.settings import load_settings, settings_from_env

pytestmark = pytest.mark.integration


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A fresh master, replica and three Sentinels (each test may kill the master)."""
    with SentinelGroup(tmp_path / "sentinel") as started:
        yield started


def _env(group: SentinelGroup, simulator_url: str, **settings: Any) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return worker_env(
        group.url,
        simulator_url,
        redis_sentinel_master=group.master_name,
        queue=f"ha-{tag}",
        key_prefix=f"ha{tag}",
        **settings,
    )


def _run(env: dict[str, str], concurrency: int = 50) -> WorkerProcess:
    """``llm-worker run`` (one process), which serves /healthz."""
    args = [sys.executable, "-m", "worker.cli", "run", "--pool", "gevent"]
    return WorkerProcess([*args, "--concurrency", str(concurrency)], env)


def test_a_master_killed_mid_run_fails_over_and_every_job_completes_once(
    group: SentinelGroup, simulator_url: str
) -> None:
    """40 streaming jobs; the master SIGKILLed mid-run: the Sentinels promote the replica,
    every job ends completed with exactly one terminal event within 120 s, and the worker
    stays up, healthy and consuming (on our transport: it alone reports liveness, and
    /healthz turns 503 after HEALTH_STALE_S without it)."""
    env = _env(group, simulator_url, health_stale_s=3)
    worker = _run(env).ready()
    try:
        with Client(settings_from_env(env)) as client:
            tag = uuid.uuid4().hex
            jobs = client.submit_many(
                [make_request(f"ha {tag} {i} [[sim tokens=80 tps=20]]") for i in range(40)]
            )
            wait_for(lambda: streaming(jobs) >= 20, 60, "20 jobs streaming", interval_s=0.2)
            old = group.kill_master()
            deadline = time.monotonic() + 120
            new = group.wait_for_failover(old, 60)
            assert new != old
            messages = _results(jobs, deadline, worker)
            histories = [list(job.events(timeout=10)) for job in jobs]
            assert all(m["usage"]["output_tokens"] == 80 for m in messages)
            for events in histories:
                assert terminals(events) == [ev.COMPLETED]
            assert all(job.status()["state"] == ev.COMPLETED for job in jobs)
            assert worker.proc.poll() is None
            wait_for(lambda: worker.http_get("/healthz").status_code == 200, 30, "healthz 200")
            after = client.submit(make_request(f"after the failover {tag} [[sim tokens=2]]"))
            assert after.result(timeout=60)["usage"]["output_tokens"] == 2
    finally:
        worker.stop()


def _results(jobs: list[Job], deadline: float, worker: WorkerProcess) -> list[dict[str, Any]]:
    """Every job's message by ``deadline``; a job that has not ended fails the test with its
    record and the worker's log."""
    messages = []
    for job in jobs:
        try:
            messages.append(job.result(timeout=max(1.0, deadline - time.monotonic())))
        except TimeoutError:
            kinds = [e["type"] for e in events_so_far(job) if e["type"] != ev.CHUNK]
            raise AssertionError(
                f"{job.job_id} did not end: {job.status()} {kinds}\n{worker.log()[-4000:]}"
            ) from None
    return messages


def _submit_until(
    client: Client, stop: threading.Event, told: dict[str, str], errors: list[Exception]
) -> None:
    """Submit one job at a time until ``stop``; remember which ones were acknowledged."""
    while not stop.is_set():
        job_id = f"ack-{uuid.uuid4().hex}"
        try:
            client.submit(make_request(f"{job_id} [[sim tokens=2]]"), job_id=job_id)
        except Exception as exc:
            errors.append(exc)
            stop.wait(0.05)  # pace the retries of a producer that is being refused
        else:
            told[job_id] = "acknowledged"


def test_a_producer_during_a_failover_loses_nothing_it_was_told_succeeded(
    group: SentinelGroup, simulator_url: str
) -> None:
    """With REDIS_MIN_REPLICAS_ACK=1 a producer submits throughout a failover: each submit
    succeeds or raises ReplicationShort, and every acknowledged job exists on the new master
    and completes once a worker runs."""
    env = _env(group, simulator_url, redis_min_replicas_ack=1)
    settings = settings_from_env(env)
    told: dict[str, str] = {}
    errors: list[Exception] = []
    stop = threading.Event()
    with Client(settings) as client:
        producer = threading.Thread(target=_submit_until, args=(client, stop, told, errors))
        producer.start()
        try:
            wait_for(lambda: len(told) >= 20, 30, "20 acknowledged submits")
            old = group.kill_master()
            group.wait_for_failover(old, 60)
            # The new master has no replica: submits are refused until the old one is back.
            wait_for(lambda: errors, 30, "a submit refused for want of a replica")
            group.restart(old)
            count = len(told)
            wait_for(lambda: len(told) > count + 10, 60, "submits acknowledged again")
        finally:
            stop.set()
            producer.join(timeout=60)
        assert errors, "the failover refused no submit"
        unclear = [exc for exc in errors if not isinstance(exc, ReplicationShort)]
        assert not unclear, unclear[:3]
        assert "LLM_WORKER_REDIS_MIN_REPLICAS_ACK" in str(errors[0])
        missing = [job_id for job_id in told if not client.redis.exists(client.keys.job(job_id))]
        assert not missing, f"{len(missing)} of {len(told)} acknowledged jobs lost"
        worker = _run(env).ready()
        try:
            for job_id in told:
                assert client.get(job_id).result(timeout=60)["usage"]["output_tokens"] == 2
        finally:
            worker.stop()


def test_the_async_client_follows_a_failover(group: SentinelGroup, simulator_url: str) -> None:
    """An AsyncClient on Sentinel submits, then reads the job back from the promoted
    replica after the master is killed, on the same client."""
    settings = settings_from_env(_env(group, simulator_url))

    async def scenario() -> dict[str, Any]:
        async with AsyncClient(settings, max_connections=8) as client:
            job = await client.submit(make_request("async ha [[sim tokens=2]]"))
            await client.redis.wait(1, 5000)  # on the replica before the kill
            old = await asyncio.to_thread(group.kill_master)
            await asyncio.to_thread(group.wait_for_failover, old, 60)
            return await (await client.get(job.job_id)).status()

    assert asyncio.run(scenario())["state"] == "queued"


def test_a_redis_in_cluster_mode_is_refused_with_the_reason(tmp_path: Path) -> None:
    """A cluster-enabled Redis is refused by producers, the worker runtime and at a worker's
    start, with a message that says why and what to use instead."""
    conf = tmp_path / "nodes.conf"
    # The cluster bus listens on the port + 10000, which must be a port too.
    port = wait_for(lambda: (p := free_port()) < 55_000 and p, 10, "a port below 55000")
    cluster = ("--cluster-enabled", "yes", "--cluster-config-file", str(conf))
    with EmbeddedRedis(port=port, data_dir=tmp_path, extra_args=cluster) as server:
        settings = load_settings(redis_url=server.url)
        with Client(settings) as client, pytest.raises(RedisClusterUnsupported) as caught:
            client.submit(make_request("to a cluster"))
        assert "cluster mode" in str(caught.value)
        assert "Sentinel" in str(caught.value)

        from worker.runtime.context import build_runtime

        with pytest.raises(RedisClusterUnsupported):
            build_runtime(settings)

        env = worker_env(server.url, "http://127.0.0.1:9")
        for worker in (_run(env, concurrency=2), WorkerProcess(celery_worker_args(), env)):
            try:
                wait_for(lambda w=worker: w.proc.poll() is not None, 60, "the worker to refuse")
                log = worker.log()
            finally:
                worker.stop()
            assert worker.proc.returncode != 0
            assert "cluster mode" in log, log[-2000:]
