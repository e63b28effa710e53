"""The shared rate limit across real worker processes, against a simulator with the same limit.

One stack for the module: a simulator allowing ``RPM`` requests per ``PERIOD_S`` (its
``--window-s``; the workers' ``RATE_LIMIT_PERIOD_S``), four gevent workers that each consume
the shared queue and their own, and one impatient worker (``RATE_LIMIT_MAX_WAIT_S=0.5``) on
its own queue. The tests run in file order: the lease test kills a worker.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import redis

from tests.support import (
    WorkerProcess,
    celery_worker_args,
    make_request,
    start_simulator,
    stop_process,
    wait_for,
    worker_env,
)
from worker import events as ev
from worker.client.sync import Client, Job
from worker.keys import Keys
from worker.settings import settings_from_env

pytestmark = pytest.mark.integration

PERIOD_S = 5.0
RPM = 20  # per PERIOD_S: 4 requests per second
MEASURE_S = 30.0
LEASE_TTL_S = 2.0
RETRY_AFTER_S = 2.0
MODEL = "deepseek-ai/DeepSeek-V3"  # rpm-limited; also the model of each worker's canary job
LEASE_MODEL = "moonshotai/Kimi-K2-Instruct"  # one call in flight
COOLDOWN_MODEL = "Pro/deepseek-ai/DeepSeek-V3"  # no limit but the cooldowns
TENANT = "tenant-slow"  # a metadata limit_key: one request per period
TENANT_MODEL = "moonshotai/Kimi-Dev-72B"  # not limited itself; its jobs carry TENANT
LIMITS = {
    MODEL: {"rpm": RPM},
    LEASE_MODEL: {"max_in_flight": 1},
    COOLDOWN_MODEL: {},
    TENANT: {"rpm": 1},
}


@dataclass
class Stack:
    simulator_url: str
    env: dict[str, str]
    shared_queue: str
    keys: Keys
    redis: redis.Redis[bytes]
    workers: list[WorkerProcess] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    impatient_queue: str = ""

    def client(self, queue: str | None = None) -> Client:
        env = {**self.env, "LLM_WORKER_QUEUE": queue or self.shared_queue}
        return Client(settings_from_env(env))

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.simulator_url}/stats", timeout=10).json()
        return stats

    def alive(self) -> list[int]:
        """Indexes of the four shared workers still running."""
        return [i for i, w in enumerate(self.workers[:4]) if w.proc.poll() is None]


@pytest.fixture(scope="module")
def stack(redis_url: str) -> Iterator[Stack]:
    """The simulator and five workers, sharing one Redis under a fresh prefix."""
    sim, sim_url = start_simulator(
        "--rpm",
        str(RPM),
        "--window-s",
        str(PERIOD_S),
        "--faults",
        "{}",  # no random faults
        "--retry-after-s",
        str(RETRY_AFTER_S),
    )
    tag = uuid.uuid4().hex[:8]
    env = worker_env(
        redis_url,
        sim_url,
        key_prefix=f"rl{tag}",
        rate_limits=orjson.dumps(LIMITS).decode(),
        rate_limit_period_s=PERIOD_S,
        rate_limit_lease_ttl_s=LEASE_TTL_S,
        concurrency=40,
    )
    s = Stack(sim_url, env, f"rl{tag}", Keys(f"rl{tag}"), redis.Redis.from_url(redis_url))
    try:
        for i in range(4):
            queue = f"rl{tag}-{i}"
            worker_env_i = {**env, "LLM_WORKER_QUEUE": queue}
            args = celery_worker_args(concurrency=40, queue=f"{s.shared_queue},{queue}")
            s.workers.append(WorkerProcess(args, worker_env_i))
            s.queues.append(queue)
        s.impatient_queue = f"rl{tag}-impatient"
        impatient_env = {
            **env,
            "LLM_WORKER_QUEUE": s.impatient_queue,
            "LLM_WORKER_RATE_LIMIT_MAX_WAIT_S": "0.5",
        }
        s.workers.append(
            WorkerProcess(
                celery_worker_args(concurrency=10, queue=s.impatient_queue), impatient_env
            )
        )
        for worker in s.workers:
            worker.ready()  # a canary on the worker's own queue: each one is consuming
        yield s
    finally:
        for worker in s.workers:  # all at once: each warm shutdown takes a moment
            if worker.proc.poll() is None:
                worker.proc.terminate()
        for worker in s.workers:
            worker.stop()
        s.redis.close()
        stop_process(sim)


def _wait_all(jobs: list[Job], timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    return [job.result(timeout=max(0.1, deadline - time.monotonic())) for job in jobs]


def _running_on(job: Job) -> str:
    """The worker running ``job`` (``host:pid``): the job hash names it until the job ends
    (read from the hash itself: producers' status does not show it)."""
    key = job.client.keys.job(job.job_id)
    worker: bytes = wait_for(lambda: job.client.redis.hget(key, "worker"), 20, f"{job} to start")
    return worker.decode()


def _workers_of(client: Client, jobs: list[Job]) -> set[str]:
    pipe = client.redis.pipeline(transaction=False)
    for job in jobs:
        pipe.hget(client.keys.job(job.job_id), "worker")
    return {w.decode() for w in pipe.execute() if w}


def _log_of(stats: dict[str, Any], model: str) -> list[dict[str, Any]]:
    return [r for r in stats["requests_log"] if r["model"] == model]


@pytest.mark.slow
def test_four_workers_use_the_whole_limit_and_never_exceed_it(stack: Stack) -> None:
    """4 workers with a 20-per-5-s limit: over 30 s at least 95 % of it, zero 429s, no waste."""
    # Start from an empty window: the canaries' slots have expired (the key vanishes).
    requests_key = stack.keys.limiter(MODEL, "requests")
    wait_for(lambda: not stack.redis.exists(requests_key), PERIOD_S + 5, "an empty window")
    httpx.post(f"{stack.simulator_url}/stats/reset", timeout=10)
    per_window = int(MEASURE_S / PERIOD_S)
    count = per_window * RPM + RPM // 2  # more than 30 s can take: the limit is the bottleneck
    # A quarter of the load on each worker's own queue: every worker is at work by
    # construction. (On the shared queue three workers' 40 slots each, plus the first window's
    # 20 calls, can hold all 130 jobs, and which worker gets none is a race.)
    jobs: list[Job] = []
    for index, queue in enumerate(stack.queues):
        with stack.client(queue) as client:
            jobs += client.submit_many(
                [
                    make_request(f"load {i}", stream=i % 2 == 0, max_tokens=8)
                    for i in range(index, count, len(stack.queues))
                ]
            )
    with stack.client() as client:
        jobs = [Job(client, job.job_id) for job in jobs]
        # A job's record names its worker only while it runs: gather the names as they show.
        seen: set[str] = set()

        def all_four_at_work() -> bool:
            seen.update(_workers_of(client, jobs))
            return len(seen) == 4

        wait_for(all_four_at_work, 20, "all four workers at work")
        results = _wait_all(jobs, timeout_s=MEASURE_S + 30)
    assert all(r["stop_reason"] in {"end_turn", "max_tokens"} for r in results)
    stats = stack.stats()
    log = _log_of(stats, MODEL)
    assert stats["rate_limited"] == 0
    assert "429" not in stats["by_status"]
    assert len(log) == count, "every job made exactly one upstream call: nothing wasted"
    start = min(r["ts"] for r in log)
    in_window = sum(1 for r in log if r["ts"] < start + MEASURE_S)
    allowed = RPM * MEASURE_S / PERIOD_S
    assert in_window >= 0.95 * allowed, f"{in_window} of {allowed} in {MEASURE_S} s"


def test_a_killed_workers_in_flight_slot_frees_after_its_lease(stack: Stack) -> None:
    """SIGKILL a worker mid-call: the next call waits for the lease, then gets the slot."""
    slow = make_request("[[sim ttft_ms=0 tps=5 tokens=300]] long", model=LEASE_MODEL)
    with stack.client() as client:
        first = client.submit(slow)
        wait_for(lambda: _log_of(stack.stats(), LEASE_MODEL), 20, "the long call to start")
        holder = _running_on(first)
        victim = next(w for w in stack.workers[:4] if holder.endswith(f":{w.proc.pid}"))
        leases_key = stack.keys.limiter(LEASE_MODEL, "leases")
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(timeout=10)
        (lease_expiry,) = [s for _, s in stack.redis.zrange(leases_key, 0, -1, withscores=True)]
        second = client.submit(make_request("after the kill", model=LEASE_MODEL, max_tokens=8))
        second_worker = _running_on(second)
        second.result(timeout=LEASE_TTL_S + 15)
    calls = _log_of(stack.stats(), LEASE_MODEL)
    assert len(calls) == 2
    # It waited for the lease (the server clock is this host's clock), and not much longer.
    assert lease_expiry - 0.05 <= calls[1]["ts"] <= lease_expiry + 2.0
    assert second_worker != holder


def test_a_cooldown_set_by_one_worker_stops_the_others(stack: Stack) -> None:
    """A 429 with retry-after at one worker pauses the key at every worker until it ends."""
    first, second, third = stack.alive()[:3]
    cooldown_key = stack.keys.limiter(COOLDOWN_MODEL, "cooldown")
    faulty = make_request("[[sim fault=429 fault_times=1]] c", model=COOLDOWN_MODEL, max_tokens=8)
    with stack.client(stack.queues[first]) as client:
        job = client.submit(faulty)
        first_worker = _running_on(job)
        wait_for(lambda: stack.redis.exists(cooldown_key), 20, "the cooldown to be set")
    others: list[Job] = []
    ran_on: set[str] = set()
    for index in (second, third):
        with stack.client(stack.queues[index]) as client:
            others.append(client.submit(make_request(f"c{index}", model=COOLDOWN_MODEL)))
            ran_on.add(_running_on(others[-1]))
    with stack.client() as client:
        for other in [job, *others]:
            Job(client, other.job_id).result(timeout=RETRY_AFTER_S + 20)
    assert first_worker not in ran_on
    assert len(ran_on) == 2
    calls = _log_of(stack.stats(), COOLDOWN_MODEL)
    (refused,) = [r for r in calls if r["status"] == 429]
    later = [r for r in calls if r["ts"] > refused["ts"]]
    assert len(later) == 3  # the retry of the first job, and the two others
    assert all(r["ts"] >= refused["ts"] + RETRY_AFTER_S - 0.05 for r in later), [
        (round(r["ts"] - refused["ts"], 3), r["status"]) for r in calls
    ]


def test_a_wait_past_the_max_requeues_the_job_with_a_countdown(stack: Stack) -> None:
    """Past RATE_LIMIT_MAX_WAIT_S the job goes back to the queue, then completes once."""
    request = make_request("tenant", model=TENANT_MODEL, max_tokens=8)
    with stack.client(stack.impatient_queue) as client:
        jobs = client.submit_many([request, request], metadata={"limit_key": TENANT})
        _wait_all(jobs, timeout_s=PERIOD_S + 20)
        events = [list(job.events(timeout=5)) for job in jobs]
        attempts = [job.status()["attempts"] for job in jobs]
    postponed = next(e for e in events if any(x["type"] == ev.RETRY for x in e))
    retry = next(x for x in postponed if x["type"] == ev.RETRY)
    assert retry["reason"] == "rate_limited"
    assert retry["error"]["type"] == "rate_limited"
    assert PERIOD_S * 0.8 <= retry["delay_s"] <= PERIOD_S * 1.5
    assert [x["type"] for x in postponed if x["type"] in ev.TERMINAL_TYPES] == [ev.COMPLETED]
    assert attempts == [1, 1], "the requeue cost no attempt"
    calls = sorted(r["ts"] for r in _log_of(stack.stats(), TENANT_MODEL))
    assert len(calls) == 2, "and no upstream call"
    assert calls[1] - calls[0] >= PERIOD_S - 0.05
