"""Per-tenant rate limits: two tenants sharing one worker each stay under their own limit."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator

import orjson
import pytest

from tests.support import WorkerProcess, celery_worker_args, make_request, worker_env
from worker import events as ev
from worker.client.sync import Client

pytestmark = pytest.mark.integration

TAG = uuid.uuid4().hex[:6]
A, B = f"rl-a-{TAG}", f"rl-b-{TAG}"
#: One upstream call at a time for each tenant; nothing shared between them.
LIMITS = {A: {"max_in_flight": 1}, B: {"max_in_flight": 1}}


@pytest.fixture(scope="module")
def limited_worker(redis_url: str, simulator_url: str) -> Iterator[WorkerProcess]:
    env = worker_env(
        redis_url,
        simulator_url,
        key_prefix=f"tl{TAG}",
        queue=f"tl{TAG}",
        rate_limits=orjson.dumps(LIMITS).decode(),
        concurrency=20,
    )
    proc = WorkerProcess(celery_worker_args(concurrency=20, queue=f"tl{TAG}"), env)
    try:
        yield proc.ready()
    finally:
        proc.stop()


def _call_span(job: object) -> tuple[float, float]:
    """From the job's first chunk to its last: inside its one upstream call."""
    chunks = [e["ts"] for e in job.events(timeout=60) if e["type"] == ev.CHUNK]  # type: ignore[attr-defined]
    return chunks[0], chunks[-1]


def _overlap(x: tuple[float, float], y: tuple[float, float]) -> bool:
    return x[0] < y[1] and y[0] < x[1]


def test_each_tenant_keeps_its_own_in_flight_limit_on_a_shared_worker(
    limited_worker: WorkerProcess,
) -> None:
    """Four slow jobs of each of two tenants, on one worker of 20: a tenant's calls never
    overlap (its max_in_flight of 1, its tenant being its limit key), while the two tenants'
    calls do (the limits are apart, not one shared slot)."""
    with Client(limited_worker.settings()) as client:
        request = make_request("slow [[sim tokens=12 tps=20]]")
        jobs = {tenant: client.submit_many([request] * 4, tenant=tenant) for tenant in (A, B)}
        for batch in jobs.values():
            for job in batch:
                job.result(timeout=120)
        spans = {tenant: [_call_span(job) for job in batch] for tenant, batch in jobs.items()}
    for tenant in (A, B):
        for x, y in itertools.combinations(spans[tenant], 2):
            assert not _overlap(x, y), f"{tenant}'s calls overlapped: {x} {y}"
    assert any(_overlap(x, y) for x in spans[A] for y in spans[B])
