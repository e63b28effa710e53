"""A live worker's /metrics, /healthz and queue gauges against real Redis, simulator and Celery.

Each test runs its own `llm-worker run` on its own queue and key prefix, so counts are exact.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from tests.support import WorkerProcess, make_request, wait_for, worker_env
from worker.client.sync import Client, Job
from worker.keys import Keys
from worker.settings import SEED_MODELS

pytestmark = pytest.mark.integration

MODEL = SEED_MODELS[4]  # make_request's model, and the canary job's


def start_worker(
    redis_url: str,
    simulator_url: str,
    pool: str,
    concurrency: int,
    env: dict[str, str] | None = None,
    **settings: Any,
) -> WorkerProcess:
    tag = uuid.uuid4().hex[:8]
    settings.setdefault("processes", 1)  # one process (not one per core) unless a test says
    worker = worker_env(
        redis_url,
        simulator_url,
        queue=f"obs-{tag}",
        key_prefix=f"obs{tag}",
        max_attempts=2,
        **settings,
    )
    args = [sys.executable, "-m", "worker.cli", "run", "--pool", pool]
    return WorkerProcess([*args, "--concurrency", str(concurrency)], {**worker, **(env or {})})


@pytest.fixture
def gevent_worker(redis_url: str, simulator_url: str) -> Iterator[WorkerProcess]:
    """`llm-worker run` under gevent, with a 2 s liveness window."""
    proc = start_worker(redis_url, simulator_url, "gevent", 2, health_stale_s=2)
    try:
        yield proc.ready()
    finally:
        proc.stop()


def get(proc: WorkerProcess, path: str) -> httpx.Response:
    return proc.http_get(path)


def scrape(proc: WorkerProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics by (name, labels)."""
    body = get(proc, "/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The sum of ``name``'s samples that have these labels (whatever their others, such as
    ``tenant``)."""
    wanted = frozenset(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def node_name(proc: WorkerProcess) -> str:
    return f"llmw-{proc.proc.pid}@{socket.gethostname()}"


def finish_all(jobs: list[Job]) -> None:
    for job in jobs:
        list(job.events(timeout=60))


# -- exact counts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pool", "concurrency", "processes"), [("gevent", 20, 1), ("prefork", 2, 1), ("gevent", 2, 2)]
)
def test_metrics_count_a_known_set_of_jobs_exactly(
    redis_url: str, simulator_url: str, pool: str, concurrency: int, processes: int
) -> None:
    """Completed, failed and retried jobs show up with their exact counts, under gevent, under
    prefork (2 processes) and with `run --processes 2` (both in multiprocess mode: nothing lost
    or doubled); promtool agrees."""
    proc = start_worker(redis_url, simulator_url, pool, concurrency, processes=processes)
    try:
        proc.ready()  # one non-streamed job completed: the canary
        with Client(proc.settings()) as client:
            tag = uuid.uuid4().hex
            jobs = [client.submit(make_request(f"ok {i} {tag} [[sim tokens=3]]")) for i in range(3)]
            jobs += [
                client.submit(make_request(f"doomed {i} {tag} [[sim tokens=3 fault=503]]"))
                for i in range(2)
            ]
            jobs.append(
                client.submit(make_request(f"once {tag} [[sim tokens=3 fault=500 fault_times=1]]"))
            )
            jobs.append(
                client.submit(make_request(f"cut {tag} [[sim tokens=30 fault=cut fault_times=1]]"))
            )
            finish_all(jobs)
            submitted = int(
                client.redis.hget(client.keys.submitted_counts(client.settings.queue), MODEL) or 0
            )
        # The canary proves one process consumes; with --processes 2 the other may still be
        # starting on a busy machine (the supervisor is ready only when every process is).
        wait_for(lambda: get(proc, "/readyz").status_code == 200, 60, "every process ready")
        samples = scrape(proc)
        body = get(proc, "/metrics").text
    finally:
        proc.stop()
    assert submitted == 8
    expected = {
        ("llm_worker_jobs_finished_total", ("outcome", "completed")): 6,
        ("llm_worker_jobs_finished_total", ("outcome", "failed")): 2,
        ("llm_worker_job_duration_seconds_count", ("outcome", "completed")): 6,
        ("llm_worker_job_duration_seconds_count", ("outcome", "failed")): 2,
        ("llm_worker_retries_total", ("reason", "http_503")): 2,
        ("llm_worker_retries_total", ("reason", "http_500")): 1,
        ("llm_worker_retries_total", ("reason", "connection_lost")): 1,
        # the cut stream had answered 200 before it broke
        ("llm_worker_upstream_requests_total", ("status", "200")): 7,
        ("llm_worker_upstream_requests_total", ("status", "503")): 4,
        ("llm_worker_upstream_requests_total", ("status", "500")): 1,
        ("llm_worker_upstream_requests_total", ("status", "network")): 0,
    }
    actual = {
        key: value(samples, key[0], model=MODEL, **{key[1][0]: key[1][1]}) for key in expected
    }
    assert actual == expected
    assert value(samples, "llm_worker_upstream_latency_seconds_count", model=MODEL) == 12
    # Default priority 5: the queue wait is per priority.
    assert value(samples, "llm_worker_queue_wait_seconds_count", model=MODEL, priority="5") == 8
    assert value(samples, "llm_worker_jobs_in_flight", model=MODEL) == 0
    queue = proc.settings().queue
    assert value(samples, "llm_worker_queue_jobs_submitted_total", queue=queue, model=MODEL) == 8
    assert value(samples, "llm_worker_queue_depth", queue=queue, state="waiting") == 0
    assert value(samples, "llm_worker_queue_depth", queue=queue, state="unacked") == 0
    assert value(samples, "llm_worker_dead_letters") == 2  # the two failed jobs
    assert value(samples, "llm_worker_ready") == 1
    # 3 streams of 3 tokens, the cut one's 30 and the retried one's 3 on its second attempt
    assert value(samples, "llm_worker_output_tokens_total", model=MODEL) > 0
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package provides it)")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=body.encode(), capture_output=True, check=False
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


# -- liveness ---------------------------------------------------------------------------------


def control(redis_url: str) -> Celery:
    return Celery("llmw-test-control", broker=redis_url)


def test_healthz_turns_unhealthy_when_the_consumer_stops_and_recovers(
    gevent_worker: WorkerProcess, redis_url: str
) -> None:
    """Under gevent, a worker whose consumer is cancelled (remote control, through the broker)
    answers 503 on /healthz and /readyz within HEALTH_STALE_S although its timers still tick,
    leaves a submitted job waiting, and is healthy again once it consumes again."""
    queue = gevent_worker.settings().queue
    node = node_name(gevent_worker)
    assert get(gevent_worker, "/healthz").status_code == 200
    assert get(gevent_worker, "/readyz").status_code == 200
    app = control(redis_url)
    replies = app.control.cancel_consumer(queue, destination=[node], reply=True, timeout=5)
    assert [node] == [name for reply in replies for name in reply], replies
    wait_for(lambda: get(gevent_worker, "/healthz").status_code == 503, 15, "/healthz to fail")
    assert get(gevent_worker, "/readyz").status_code == 503
    assert value(scrape(gevent_worker), "llm_worker_ready") == 0
    with Client(gevent_worker.settings()) as client:
        job = client.submit(make_request(f"parked {uuid.uuid4().hex} [[sim tokens=2]]"))
        wait_for(
            lambda: (
                value(scrape(gevent_worker), "llm_worker_queue_depth", queue=queue, state="waiting")
                == 1
            ),
            10,
            "the parked job to show as waiting",
        )
        assert job.status()["state"] == "queued"
        replies = app.control.add_consumer(queue, destination=[node], reply=True, timeout=5)
        assert [node] == [name for reply in replies for name in reply], replies
        wait_for(
            lambda: get(gevent_worker, "/healthz").status_code == 200, 15, "/healthz to recover"
        )
        job.result(timeout=30)
    assert get(gevent_worker, "/readyz").status_code == 200
    assert value(scrape(gevent_worker), "llm_worker_ready") == 1


def test_a_saturated_worker_stays_healthy_and_its_backlog_shows(
    gevent_worker: WorkerProcess,
) -> None:
    """With every slot busy kombu sends no BRPOP, yet the worker is consuming: /healthz stays
    200 past the window; the gauges show two jobs unacked and in flight, one waiting."""
    queue = gevent_worker.settings().queue
    with Client(gevent_worker.settings()) as client:
        tag = uuid.uuid4().hex
        jobs = [
            client.submit(make_request(f"slow {i} {tag} [[sim ttft_ms=5000 tokens=2]]"))
            for i in range(3)
        ]
        # concurrency 2, prefetch 1: two jobs run and hold their messages, one waits
        wait_for(
            lambda: (
                (s := scrape(gevent_worker))
                and value(s, "llm_worker_queue_depth", queue=queue, state="unacked") == 2
                and value(s, "llm_worker_queue_depth", queue=queue, state="waiting") == 1
                and value(s, "llm_worker_jobs_in_flight", model=MODEL) == 2
            ),
            15,
            "two running jobs and one waiting",
        )
        saturated_at = time.monotonic()
        statuses = []

        def first_done() -> bool:
            statuses.append(get(gevent_worker, "/healthz").status_code)
            return any(job.status()["state"] == "completed" for job in jobs)

        wait_for(first_done, 30, "the first slow job to complete", interval_s=0.2)
        assert time.monotonic() - saturated_at > gevent_worker.settings().health_stale_s
        assert set(statuses) == {200}
        finish_all(jobs)
    samples = scrape(gevent_worker)
    assert value(samples, "llm_worker_queue_depth", queue=queue, state="unacked") == 0
    assert value(samples, "llm_worker_queue_depth", queue=queue, state="waiting") == 0
    assert value(samples, "llm_worker_jobs_in_flight", model=MODEL) == 0


# -- queue-wide gauges ------------------------------------------------------------------------


def test_unacked_counts_only_this_queues_entries_and_dead_letters_follow_the_stream(
    gevent_worker: WorkerProcess,
) -> None:
    """kombu's unacked hash is shared by every queue: another queue's entry is not ours; a
    queue item that is not a message lands in the dead-letter stream and the gauge shows it."""
    settings = gevent_worker.settings()
    keys = Keys(settings.key_prefix)
    with Client(settings) as client:
        r = client.redis
        foreign_tag = f"foreign-{uuid.uuid4().hex}"
        r.hset("unacked", foreign_tag, orjson.dumps([{"body": ""}, "other", "some-other-queue"]))
        try:
            samples = scrape(gevent_worker)
            assert (
                value(samples, "llm_worker_queue_depth", queue=settings.queue, state="unacked") == 0
            )
        finally:
            r.hdel("unacked", foreign_tag)
        assert value(samples, "llm_worker_dead_letters") == 0
        r.lpush(settings.queue, b"this is not a kombu message")
        wait_for(lambda: r.xlen(keys.dead_letters) == 1, 15, "the item to be dead-lettered")
        assert value(scrape(gevent_worker), "llm_worker_dead_letters") == 1
        assert get(gevent_worker, "/healthz").status_code == 200  # and it kept consuming


def children(pid: int) -> set[int]:
    # ps exits 1 when there are none (between a kill and the respawn): an empty set.
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], check=False, capture_output=True, text=True
    )
    return {int(p) for p in out.stdout.split()}


def test_prefork_keeps_the_counts_of_killed_children(
    redis_url: str, simulator_url: str, tmp_path: Path
) -> None:
    """The multiprocess directory is emptied of a previous run's files at start; SIGKILLed
    prefork children are replaced, the jobs they finished still count, once, and their
    in-flight gauges are swept."""
    multiproc_dir = tmp_path / "metrics"
    multiproc_dir.mkdir()
    (multiproc_dir / "counter_1.db").write_bytes(b"left by a previous run")
    (multiproc_dir / "notes.txt").write_text("not prometheus-client's: kept")
    proc = start_worker(
        redis_url, simulator_url, "prefork", 2, env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}
    )
    try:
        proc.ready()
        assert not (multiproc_dir / "counter_1.db").exists()
        assert (multiproc_dir / "notes.txt").exists()
        with Client(proc.settings()) as client:
            tag = uuid.uuid4().hex
            finish_all(
                [client.submit(make_request(f"k {i} {tag} [[sim tokens=2]]")) for i in range(4)]
            )
        parent = proc.proc.pid
        old = wait_for(lambda: (c := children(parent)) and len(c) == 2 and c, 10, "two children")
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: (c := children(parent)) and len(c) == 2 and not (c & old), 30, "new children"
        )
        samples = scrape(proc)
        assert (
            value(samples, "llm_worker_jobs_finished_total", model=MODEL, outcome="completed") == 5
        )
        assert value(samples, "llm_worker_jobs_in_flight", model=MODEL) == 0
        live = [f.name for f in multiproc_dir.glob("gauge_live*")]
        assert not [f for f in live if any(f.endswith(f"_{pid}.db") for pid in old)], live
    finally:
        proc.stop()
