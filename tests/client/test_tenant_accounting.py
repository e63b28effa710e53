"""A tenant's quota and accounting through the Python producers and a real worker: the
queued quota refuses past it and gives places back as jobs leave the queue; the usage
counters in Redis are per tenant; metrics and `llm-worker usage` show them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    ROOT,
    WorkerProcess,
    make_request,
    wait_for,
    worker_env,
)
from worker.accounting.pricing import utc_day
from worker.client.aio import AsyncClient
from worker.client.core import submitted_field
from worker.client.sync import Client
from worker.errors import QuotaExceeded
from worker.settings import settings_from_env

pytestmark = pytest.mark.integration

TAG = uuid.uuid4().hex[:6]
METERED, OTHER = f"metered-{TAG}", f"other-{TAG}"
MODEL = "deepseek-ai/DeepSeek-V3"


@pytest.fixture(scope="module")
def metered_worker(redis_url: str, simulator_url: str) -> Iterator[WorkerProcess]:
    """A worker whose settings name METERED (its quota): METERED is a metric label value."""
    env = worker_env(
        redis_url,
        simulator_url,
        key_prefix=f"ta{TAG}",
        queue=f"ta{TAG}",
        tenant_max_queued=orjson.dumps({"default": 3, METERED: 3}).decode(),
    )
    args = [sys.executable, "-m", "worker.cli", "run", "--concurrency", "10"]
    proc = WorkerProcess(args, env)  # `run` serves /metrics
    try:
        yield proc.ready()
    finally:
        proc.stop()


def _unconsumed(worker: WorkerProcess) -> Client:
    """A producer on the worker's Redis and prefix but a queue no worker takes from."""
    return Client(settings_from_env({**worker.env, "LLM_WORKER_QUEUE": f"idle-{TAG}"}))


def test_the_quota_refuses_past_it_and_each_job_that_leaves_the_queue_frees_a_place(
    metered_worker: WorkerProcess,
) -> None:
    """Quota 3: two queued, then two more submitted together: one is created, one refused
    (QuotaExceeded lists both); a cancelled job frees its place; jobs without a tenant have
    no quota; on a live worker, a job that started no longer counts."""
    tenant = f"q-{TAG}"
    with _unconsumed(metered_worker) as idle:
        first = idle.submit_many([make_request("a"), make_request("b")], tenant=tenant)
        with pytest.raises(QuotaExceeded) as info:
            idle.submit_many(
                [make_request("c"), make_request("d")], job_ids=["c", "d"], tenant=tenant
            )
        assert info.value.created == [f"{tenant}/c"]
        assert info.value.job_ids == [f"{tenant}/d"]
        assert "3 queued jobs" in str(info.value)
        assert idle.get("c", tenant=tenant).status()["state"] == "queued"
        assert not idle.redis.exists(idle.keys.job(f"{tenant}/d"))
        assert first[0].cancel() is True
        idle.submit(make_request("d"), job_id="d", tenant=tenant)
        with pytest.raises(QuotaExceeded):
            idle.submit(make_request("e"), tenant=tenant)
        assert len(idle.submit_many([make_request(f"n{i}") for i in range(5)])) == 5
        for job_id in (first[1].job_id, f"{tenant}/c", f"{tenant}/d"):
            idle.get(job_id).cancel()
    with Client(metered_worker.settings()) as live:
        for i in range(5):  # one at a time: each must leave the queue for the next to fit
            live.submit(make_request(f"live {i}", stream=False), tenant=tenant).result(timeout=60)
        assert live.redis.zcard(live.keys.tenant_queued(tenant)) == 0


def _metrics(worker: WorkerProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body = worker.http_get("/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def _usage_cli(worker: WorkerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_WORKER_")}
    env.update({k: v for k, v in worker.env.items() if k.startswith("LLM_WORKER_")})
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "usage", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_usage_counters_and_metrics_are_per_tenant(metered_worker: WorkerProcess) -> None:
    """Two completed jobs for METERED and one for OTHER: the usage hash of each tenant and day
    counts its own (jobs, and tokens equal to the jobs' usage); metrics label METERED by
    name and OTHER (not configured) as `other`; `llm-worker usage` prints both."""
    tokens = [0, 0]
    with Client(metered_worker.settings()) as client:
        for i in range(2):
            job = client.submit(make_request(f"metered {i}", stream=i == 0), tenant=METERED)
            job.result(timeout=60)
            usage = job.status()["usage"]
            tokens[0] += usage["input_tokens"]
            tokens[1] += usage["output_tokens"]
        client.submit(make_request("other"), tenant=OTHER).result(timeout=60)
        day = utc_day(client.get(job.job_id).status()["finished_at"])
        fields = {
            k.decode(): v.decode()
            for k, v in client.redis.hgetall(client.keys.usage(METERED, day)).items()
        }
        other = client.redis.hgetall(client.keys.usage(OTHER, day))
    assert fields[f"{MODEL}|jobs"] == "2"
    assert fields[f"{MODEL}|input_tokens"] == str(tokens[0])
    assert fields[f"{MODEL}|output_tokens"] == str(tokens[1])
    assert other[f"{MODEL}|jobs".encode()] == b"1"

    def finished(tenant: str) -> float:
        key = frozenset({"model": MODEL, "outcome": "completed", "tenant": tenant}.items())
        return _metrics(metered_worker).get(("llm_worker_jobs_finished_total", key), 0)

    wait_for(lambda: finished(METERED) == 2, 10, "the metered tenant's finished jobs")
    samples = _metrics(metered_worker)
    assert finished("other") >= 1
    tokens_key = frozenset({"model": MODEL, "tenant": METERED}.items())
    assert samples[("llm_worker_output_tokens_total", tokens_key)] == tokens[1]
    submitted = frozenset({"queue": f"ta{TAG}", "model": MODEL, "tenant": METERED}.items())
    assert samples[("llm_worker_queue_jobs_submitted_total", submitted)] == 2

    printed = _usage_cli(metered_worker, "--json", "--days", "2")
    assert printed.returncode == 0, printed.stderr
    rows = json.loads(printed.stdout)
    mine: dict[str, Any] = {row["tenant"]: row for row in rows if row["tenant"] in {METERED, OTHER}}
    assert mine[METERED]["jobs"] == 2
    assert mine[METERED]["output_tokens"] == tokens[1]
    assert mine[OTHER]["jobs"] == 1
    table = _usage_cli(metered_worker, "--tenant", METERED)
    assert table.returncode == 0, table.stderr
    assert METERED in table.stdout
    assert OTHER not in table.stdout


def test_the_submitted_counter_counts_each_created_job_once(
    metered_worker: WorkerProcess,
) -> None:
    """The Redis counter behind llm_worker_queue_jobs_submitted_total is written in the
    submit's own step: created jobs count once each, a resubmitted id and a job the quota
    refused count nothing, and the async producer counts the same way."""
    with _unconsumed(metered_worker) as idle:
        counts = idle.keys.submitted_counts(idle.settings.queue)
        field = submitted_field(MODEL, METERED)

        def added() -> int:
            return int(idle.redis.hget(counts, field) or 0) - before

        before = int(idle.redis.hget(counts, field) or 0)
        jobs = idle.submit_many(
            [make_request("a"), make_request("b")], job_ids=["a", "b"], tenant=METERED
        )
        idle.submit(make_request("a"), job_id="a", tenant=METERED)  # the same job again
        with pytest.raises(QuotaExceeded):  # quota 3: c is created, d refused
            idle.submit_many(
                [make_request("c"), make_request("d")], job_ids=["c", "d"], tenant=METERED
            )
        assert added() == 3
        assert jobs[0].cancel() is True

        async def submit_async() -> None:
            async with AsyncClient(idle.settings) as producer:
                await producer.submit(make_request("b"), job_id="b", tenant=METERED)
                await producer.submit(make_request("e"), job_id="e", tenant=METERED)

        asyncio.run(submit_async())
        assert added() == 4
