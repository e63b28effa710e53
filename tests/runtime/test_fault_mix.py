"""500 jobs against an upstream that fails a fifth of its calls in every way it can.

Every job ends in exactly one terminal event, at least 99% complete, and the retries the
worker reports are exactly the faults the simulator injected: none unhandled, none invented.
"""

from __future__ import annotations

import collections
import json
import uuid

import httpx
import pytest

from tests.runtime.test_retries import FAULTS
from tests.support import (
    WorkerProcess,
    celery_worker_args,
    make_request,
    start_simulator,
    stop_process,
    worker_env,
)
from worker import events as ev
from worker.client.sync import Client
from worker.settings import settings_from_env

pytestmark = pytest.mark.integration

MIX = {
    "429": 0.10,
    "500": 0.02,
    "502": 0.015,
    "503": 0.015,
    "529": 0.02,
    "reset": 0.01,
    "cut": 0.02,
    "error_event": 0.01,
    "malformed": 0.01,
    "stall": 0.01,
}
# fault kind -> the retry reason the worker reports for it (streamed requests)
REASONS = {**FAULTS, "stall": "idle_timeout"}
JOBS = 500


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_five_hundred_jobs_through_a_fault_mix(
    redis_url: str, broker: str, request: pytest.FixtureRequest
) -> None:
    """Every job ends once, at least 99% complete, and each injected fault is one retry, with
    the broker on the results Redis and on RabbitMQ."""
    extra = {"broker_url": request.getfixturevalue("rabbitmq").url} if broker == "amqp" else {}
    faults = json.dumps({**MIX, "retry_after_s": 0.2, "stall_s": 3})
    simulator, url = start_simulator("--faults", faults, "--seed", "7")
    queue = f"llmw-mix-{uuid.uuid4().hex[:6]}"
    env = worker_env(redis_url, url, queue=queue, concurrency=100, idle_timeout_s=1, **extra)
    worker = WorkerProcess(celery_worker_args(concurrency=100, queue=queue), env)
    try:
        tag = uuid.uuid4().hex
        with Client(settings_from_env(env)) as client:
            jobs = client.submit_many(
                [make_request(f"mix {tag} {i} [[sim tokens=6]]") for i in range(JOBS)]
            )
            histories = [list(job.events(timeout=180)) for job in jobs]

        stats = httpx.get(f"{url}/stats", params={"log": 0}, timeout=5).json()
    finally:
        worker.stop()
        stop_process(simulator)

    outcomes = collections.Counter()
    retries: collections.Counter[str] = collections.Counter()
    final_faults: collections.Counter[str] = collections.Counter()
    for events in histories:
        terminals = [e for e in events if e["type"] in ev.TERMINAL_TYPES]
        assert len(terminals) == 1, [e["type"] for e in events]
        assert terminals[0] is events[-1]
        outcomes[terminals[0]["type"]] += 1
        retries.update(e["reason"] for e in events if e["type"] == ev.RETRY)
        if terminals[0]["type"] == ev.FAILED:
            final_faults[terminals[0]["error"]["type"]] += 1
        if terminals[0]["type"] == ev.COMPLETED:
            assert terminals[0]["message"]["usage"]["output_tokens"] == 6
    # The run's table (shown with `pytest -s`): what was injected, what the worker reported.
    print(f"\noutcomes: {dict(outcomes)}")
    print(f"{'fault':<12}{'injected':>9}  {'retry reason':<20}{'retries':>8}")
    for kind in MIX:
        reason = REASONS[kind]
        print(f"{kind:<12}{stats['faults'].get(kind, 0):>9}  {reason:<20}{retries[reason]:>8}")
    assert outcomes[ev.COMPLETED] >= 0.99 * JOBS, outcomes

    injected = stats["faults"]
    assert set(injected) == set(MIX), injected  # every kind was drawn at least once
    expected: collections.Counter[str] = collections.Counter()
    for kind, count in injected.items():
        expected[REASONS[kind]] += count
    # Each injected fault cost exactly one retry, except a job's last failed attempt.
    assert sum(retries.values()) + sum(final_faults.values()) == sum(expected.values())
    if not final_faults:
        assert retries == expected
    # One upstream call per attempt: one per job, one per retry, none hidden or doubled. A job
    # that failed took its last fault without a retry, so it is not in the retries.
    started = sum(1 for events in histories for e in events if e["type"] == ev.STARTED)
    assert started == JOBS + sum(retries.values())
    assert stats["requests"] == started
    assert stats["requests"] == JOBS + sum(expected.values()) - sum(final_faults.values())
