"""`llm-worker run --processes N`: several gevent worker processes under one supervisor that
serves /metrics and /healthz for all of them, starts again a process that died, and passes
a warm shutdown on. Real Redis, simulator and Celery; the supervisor is a subprocess."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Iterator

import psutil
import pytest

from tests.support import WorkerProcess, make_request, wait_for, worker_env
from worker import events as ev
from worker.client.sync import Client
from worker.settings import SEED_MODELS

pytestmark = pytest.mark.integration

MODEL = SEED_MODELS[4]


def _start(redis_url: str, simulator_url: str, processes: int = 2) -> WorkerProcess:
    tag = uuid.uuid4().hex[:8]
    env = worker_env(
        redis_url,
        simulator_url,
        queue=f"procs-{tag}",
        key_prefix=f"procs{tag}",
        health_stale_s=3,
        shutdown_grace_s=20,
    )
    args = [sys.executable, "-m", "worker.cli", "run", "--pool", "gevent", "--concurrency", "3"]
    return WorkerProcess([*args, "--processes", str(processes)], env)


@pytest.fixture
def supervised(redis_url: str, simulator_url: str) -> Iterator[WorkerProcess]:
    proc = _start(redis_url, simulator_url)
    try:
        yield proc.ready()
    finally:
        proc.stop()


def _children(proc: WorkerProcess) -> list[psutil.Process]:
    return psutil.Process(proc.proc.pid).children()


def _metric(proc: WorkerProcess, line_start: str) -> float:
    for line in proc.http_get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_both_processes_run_jobs_and_healthz_answers_for_both(supervised: WorkerProcess) -> None:
    """12 jobs of about 1 s on 2 processes of 3 slots: no process can hold them all, so both
    run some at once (each names itself in the hash of the job it runs)."""
    assert len(_children(supervised)) == 2
    wait_for(lambda: supervised.http_get("/healthz").status_code == 200, 20, "healthz 200")
    with Client(supervised.settings()) as client:
        tag = uuid.uuid4().hex
        jobs = [
            client.submit(make_request(f"p {i} {tag} [[sim tokens=20 tps=20]]")) for i in range(12)
        ]
        keys = [client.keys.job(job.job_id) for job in jobs]

        def running_on() -> set[str]:
            return {w.decode() for w in (client.redis.hget(k, "worker") for k in keys) if w}

        # The hash names the worker while the job runs.
        workers = wait_for(lambda: len(r := running_on()) == 2 and r, 30, "both running jobs")
        for job in jobs:
            assert job.result(timeout=60)["usage"]["output_tokens"] == 20
    pids = {str(p.pid) for p in _children(supervised)}
    assert len(workers) == 2
    assert {w.rsplit(":", 1)[1] for w in workers} == pids  # "host:pid"
    assert supervised.http_get("/readyz").status_code == 200


def test_a_killed_process_is_started_again_and_healthz_reports_the_gap(
    supervised: WorkerProcess,
) -> None:
    wait_for(lambda: supervised.http_get("/healthz").status_code == 200, 20, "healthz 200")
    victim = _children(supervised)[0]
    victim.kill()
    wait_for(lambda: supervised.http_get("/healthz").status_code == 503, 10, "healthz 503")
    wait_for(
        lambda: len(pids := {p.pid for p in _children(supervised)}) == 2 and victim.pid not in pids,
        30,
        "a new worker process",
    )
    wait_for(lambda: supervised.http_get("/healthz").status_code == 200, 30, "healthz 200 again")
    assert _metric(supervised, "llm_worker_process_restarts_total ") == 1
    supervised.ready()  # and it runs jobs


def test_sigterm_lets_running_jobs_finish_then_every_process_exits(
    redis_url: str, simulator_url: str
) -> None:
    """Each process drains as a lone worker would: the 4 streams (2 s each) complete."""
    proc = _start(redis_url, simulator_url).ready()
    try:
        children = _children(proc)
        with Client(proc.settings()) as client:
            tag = uuid.uuid4().hex
            jobs = [
                client.submit(make_request(f"t {i} {tag} [[sim tokens=40 tps=20]]"))
                for i in range(4)
            ]
            wait_for(
                lambda: all(j.status()["state"] == "running" for j in jobs), 20, "4 jobs running"
            )
            os.kill(proc.proc.pid, signal.SIGTERM)
            assert proc.proc.wait(timeout=40) == 0
            assert all(j.status()["state"] == ev.COMPLETED for j in jobs)
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    finally:
        proc.stop()
