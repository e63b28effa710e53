"""Fallbacks, exact cost and budgets against the simulator, with a real worker and Redis.

One model of the simulator is down (every request for it answers 529, ``fault_model=``);
the worker falls back to another. Costs are checked against the usage the simulator
reports for each request it answered.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    ROOT,
    WorkerProcess,
    events_so_far,
    make_request,
    start_simulator,
    stop_process,
    terminals,
    wait_for,
    worker_env,
)
from worker import events as ev
from worker.catalogue import SEED_MODELS
from worker.client.sync import Client, Job
from worker.errors import BudgetExceeded, JobNotFound
from worker.settings import settings_from_env

pytestmark = pytest.mark.integration

DOWN = "deepseek-ai/DeepSeek-V3"  # make_request's model; down in these tests
UP = "moonshotai/Kimi-K2-Instruct"
NOT_ALLOWED = "baidu/ERNIE-4.5-300B-A47B"
SMALL = "moonshotai/Kimi-Dev-72B"  # max_tokens 100 in this catalogue
PRICES = {
    DOWN: {"input_per_mtok": "0.27", "output_per_mtok": "1.1"},
    UP: {"input_per_mtok": "0.6", "output_per_mtok": "2.5"},
}
BUDGETS = {
    "acme": {"usd_per_day": 1000},
    "tight": {"usd_per_day": "0.000001"},
    "held": {"usd_per_month": "0.000001"},
}


def _down(tag: str, tokens: int = 6) -> str:
    return f"{tag} {uuid.uuid4().hex} [[sim tokens={tokens} fault=529 fault_model={DOWN}]]"


@pytest.fixture(scope="module")
def simulator() -> Iterator[str]:
    """A simulator of its own, so its request log holds only this module's requests."""
    proc, url = start_simulator("--models", ",".join(SEED_MODELS), "--retry-after-s", "30")
    yield url
    stop_process(proc)


@pytest.fixture(scope="module")
def worker(redis_url: str, simulator: str) -> Iterator[WorkerProcess]:
    """`llm-worker run` with fallbacks, prices and budgets; ERNIE not allowed, Kimi-Dev small."""
    tag = uuid.uuid4().hex[:8]
    catalogue = {name: {"max_tokens": 100 if name == SMALL else 8192} for name in SEED_MODELS}
    env = worker_env(
        redis_url,
        simulator,
        queue=f"money-{tag}",
        key_prefix=f"money{tag}",
        models=json.dumps(catalogue),
        allowed_models=",".join(n for n in SEED_MODELS if n != NOT_ALLOWED),
        fallbacks=json.dumps({DOWN: [UP]}),
        prices=json.dumps(PRICES),
        budgets=json.dumps(BUDGETS),
        budget_hold_s=0.5,  # the default (60 s) would make the hold test a minute long
        rate_limits=json.dumps({"default": {}}),  # no limit, but 429 cooldowns are shared
    )
    args = [sys.executable, "-m", "worker.cli", "run", "--pool", "gevent", "--concurrency", "20"]
    proc = WorkerProcess(args, env)
    try:
        yield proc.ready()
    finally:
        proc.stop()


@pytest.fixture
def client(worker: WorkerProcess, simulator: str) -> Iterator[Client]:
    httpx.post(f"{simulator}/stats/reset", timeout=5).raise_for_status()
    with Client(worker.settings()) as c:
        yield c


def sim_log(simulator: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{simulator}/stats", timeout=10).json()["requests_log"])


def price_of(model: str, usage: dict[str, int]) -> Decimal:
    """Usage x price, in exact decimal USD (the test's own arithmetic)."""
    price = PRICES[model]
    return (
        usage["input_tokens"] * Decimal(price["input_per_mtok"])
        + usage["output_tokens"] * Decimal(price["output_per_mtok"])
    ) / 10**6


def finish(jobs: list[Job]) -> list[list[dict[str, Any]]]:
    return [list(job.events(timeout=60)) for job in jobs]


def scrape(worker: WorkerProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body = worker.http_get("/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def usage_fields(client: Client, tenant: str) -> dict[str, Decimal]:
    """The tenant's usage hashes over every day, summed per field."""
    total: dict[str, Decimal] = {}
    for key in client.redis.scan_iter(match=f"{client.keys.prefix}:usage:{tenant}:*"):
        for field, raw in client.redis.hgetall(key).items():
            name = field.decode()
            total[name] = total.get(name, Decimal(0)) + Decimal(raw.decode())
    return total


def test_every_job_completes_on_the_fallback_within_max_attempts(
    client: Client, simulator: str
) -> None:
    """A model that always answers 529: each job switches after 2 failures and completes on
    the fallback; the retry events, the completed event and the record name the models."""
    jobs = [
        client.submit(make_request(_down("fallback"), stream=stream))
        for stream in (True, True, False)
    ]
    max_attempts = client.settings.max_attempts
    for job, events in zip(jobs, finish(jobs), strict=True):
        kinds = [e["type"] for e in events]
        assert kinds[-1] == ev.COMPLETED, events[-1]
        retries = [e for e in events if e["type"] == ev.RETRY]
        assert [r["model"] for r in retries] == [DOWN, UP]
        assert all(r["error"]["status_code"] == 529 for r in retries)
        completed = events[-1]
        assert completed["answered_by"] == UP
        assert completed["message"]["model"] == UP  # the request went out with its model replaced
        status = job.status()
        assert status["answered_by"] == UP
        assert status["model"] == DOWN
        assert status["attempts"] == 3 <= max_attempts
        usage = completed["message"]["usage"]
        assert Decimal(status["cost_usd"]) == price_of(UP, usage)
    calls = [(r["model"], r["status"]) for r in sim_log(simulator)]
    assert sorted(calls) == sorted([(DOWN, 529)] * 6 + [(UP, 200)] * 3)


def test_fallbacks_not_allowed_or_too_small_are_skipped(
    client: Client, worker: WorkerProcess, simulator: str
) -> None:
    """A fallback outside ALLOWED_MODELS and one whose max_tokens bound the request exceeds are
    left out with a log line; the job goes on to the next fallback."""
    job = client.submit(
        make_request(_down("skip"), max_tokens=256), fallback_models=[NOT_ALLOWED, SMALL, UP]
    )
    (events,) = finish([job])
    assert events[-1]["type"] == ev.COMPLETED
    assert events[-1]["answered_by"] == UP
    assert [e["model"] for e in events if e["type"] == ev.RETRY] == [DOWN, UP]
    models = {r["model"] for r in sim_log(simulator)}
    assert models == {DOWN, UP}
    log = wait_for(
        lambda: worker.log() if worker.log().count("fallback_model_skipped") >= 2 else "",
        10,
        "the skip log lines",
    )
    skipped = [json.loads(line) for line in log.splitlines() if "fallback_model_skipped" in line]
    assert {(s["fallback"], s["reason"]) for s in skipped} >= {
        (NOT_ALLOWED, "not_allowed"),
        (SMALL, "max_tokens"),
    }


def test_a_model_under_a_cooldown_is_skipped_at_once(client: Client, simulator: str) -> None:
    """After a 429 with retry-after on the down model, a new job goes to the fallback without
    calling it: a retry event says why and names the fallback; the attempt does not count."""
    first = client.submit(
        make_request(
            f"cool {uuid.uuid4().hex} [[sim tokens=3 fault=429 fault_times=1 fault_model={DOWN}]]"
        )
    )
    wait_for(lambda: any(e["type"] == ev.RETRY for e in events_so_far(first)), 30, "the first 429")
    try:
        job = client.submit(make_request(_down("cooling")))
        (events,) = finish([job])
        assert events[-1]["type"] == ev.COMPLETED
        assert events[-1]["answered_by"] == UP
        (retry,) = [e for e in events if e["type"] == ev.RETRY]
        assert retry["reason"] == "model_cooling_down"
        assert retry["model"] == UP
        assert job.status()["attempts"] == 1
        first.result(timeout=60)
        # The first job's 429 only: its next attempt skipped the cooling model too.
        assert [r["status"] for r in sim_log(simulator) if r["model"] == DOWN] == [429]
    finally:
        # The next tests count the down model's 529s: its cooldown must not outlive this one.
        client.redis.delete(client.keys.limiter(DOWN, "cooldown"))


def test_a_long_429_moves_to_the_fallback_without_waiting_it_out(
    client: Client, simulator: str
) -> None:
    """A 429 asking for 30 s on a model with a fallback: the retry does not wait 30 s, and the
    next attempt skips the cooling model for the fallback, which answers."""
    prompt = f"long429 {uuid.uuid4().hex} [[sim tokens=3 fault=429 fault_model={DOWN}]]"
    try:
        job = client.submit(make_request(prompt))
        (events,) = finish([job])
        retries = [e for e in events if e["type"] == ev.RETRY]
        assert [(r["reason"], r["model"]) for r in retries] == [
            ("http_429", DOWN),
            ("model_cooling_down", UP),
        ]
        assert retries[0]["delay_s"] < 30  # backoff only, not the model's retry-after
        assert events[-1]["answered_by"] == UP
        assert [r["status"] for r in sim_log(simulator) if r["model"] == DOWN] == [429]
    finally:
        client.redis.delete(client.keys.limiter(DOWN, "cooldown"))


def test_an_empty_fallback_list_turns_the_configured_one_off(client: Client) -> None:
    """A job's own fallback_models=[] replaces FALLBACKS: it fails on the down model."""
    job = client.submit(make_request(_down("nofallback")), fallback_models=[])
    (events,) = finish([job])
    assert events[-1]["type"] == ev.FAILED
    assert events[-1]["error"]["status_code"] == 529
    assert job.status()["cost_usd"] == "0"
    assert "answered_by" not in job.status()


def test_cost_of_a_batch_is_usage_times_price_exactly(
    client: Client, worker: WorkerProcess, simulator: str
) -> None:
    """The jobs' costs, the tenant's Redis counters and /metrics all equal the sum of the
    simulator's reported usage times price; failed calls and failed jobs cost 0."""
    prompts = [f"batch {i} {uuid.uuid4().hex} [[sim tokens={3 + i}]]" for i in range(8)]
    prompts += [f"cut {uuid.uuid4().hex} [[sim tokens=9 fault=cut fault_times=1]]" for _ in "ab"]
    prompts += [_down("batch-down", tokens=7) for _ in "ab"]
    requests = [make_request(p, stream=i % 3 != 0) for i, p in enumerate(prompts)]
    doomed = make_request(f"doomed {uuid.uuid4().hex} [[sim tokens=3 fault=503]]", model=UP)
    jobs = client.submit_many([*requests, doomed], tenant="acme")
    ends = finish(jobs)
    assert [e[-1]["type"] for e in ends] == [ev.COMPLETED] * len(requests) + [ev.FAILED]
    assert jobs[-1].status()["cost_usd"] == "0"

    answered = [r for r in sim_log(simulator) if r["usage"] is not None]
    failed_calls = [r for r in sim_log(simulator) if r["usage"] is None]
    assert len(answered) == len(requests)
    assert len(failed_calls) == 2 + 4 + client.settings.max_attempts  # cuts, 529s, 503s
    expected = sum((price_of(r["model"], r["usage"]) for r in answered), Decimal(0))
    recorded = sum((Decimal(job.status()["cost_usd"]) for job in jobs), Decimal(0))
    assert recorded == expected
    assert expected > 0

    fields = usage_fields(client, "acme")
    assert fields[f"{UP}|cost_pusd"] + fields[f"{DOWN}|cost_pusd"] == expected * 10**12
    for kind in ("input_tokens", "output_tokens"):
        assert fields[f"{UP}|{kind}"] + fields[f"{DOWN}|{kind}"] == sum(
            r["usage"][kind] for r in answered
        )
    assert fields[f"{UP}|jobs"] == 2
    assert fields[f"{DOWN}|jobs"] == len(requests) - 2

    def metrics_caught_up() -> dict[str, float] | None:
        samples = scrape(worker)
        got = {
            model: samples.get(
                ("llm_worker_cost_usd_total", frozenset({("model", model), ("tenant", "acme")})),
                0.0,
            )
            for model in (UP, DOWN)
        }
        want = {model: float(fields[f"{model}|cost_pusd"] / 10**12) for model in (UP, DOWN)}
        return got if got == pytest.approx(want, rel=1e-9, abs=1e-15) else None

    wait_for(metrics_caught_up, 10, "/metrics to agree with Redis")


def test_a_tenant_over_budget_is_refused_while_another_submits(client: Client) -> None:
    """Once 'tight' has spent its day budget its submits raise BudgetExceeded naming the budget
    and nothing is written; 'acme' still submits and completes."""
    first = client.submit(
        make_request(f"tight {uuid.uuid4().hex} [[sim tokens=5]]"), tenant="tight"
    )
    assert first.result(timeout=60)
    with pytest.raises(BudgetExceeded) as refused:
        client.submit(make_request("more"), tenant="tight", job_id="refused")
    assert "'tight'" in str(refused.value)
    assert "0.000001 USD per day" in str(refused.value)
    with pytest.raises(JobNotFound):
        client.get("refused", tenant="tight").status()
    other = client.submit(make_request(f"acme {uuid.uuid4().hex} [[sim tokens=5]]"), tenant="acme")
    assert other.result(timeout=60)["usage"]["output_tokens"] == 5


def test_queued_jobs_of_a_tenant_at_budget_are_held_not_failed(
    client: Client, worker: WorkerProcess
) -> None:
    """A job queued for a tenant at its budget waits in the queue (no failure, no slot) and
    runs once the period's spend is gone (as at the month's roll-over)."""
    spend = client.submit(make_request(f"held {uuid.uuid4().hex} [[sim tokens=5]]"), tenant="held")
    spend.result(timeout=60)
    # A producer without the budget settings (or one that submitted before the budget was
    # reached) puts a job in the queue all the same.
    unaware = settings_from_env({k: v for k, v in worker.env.items() if k != "LLM_WORKER_BUDGETS"})
    with Client(unaware) as producer:
        queued = producer.submit(
            make_request(f"held2 {uuid.uuid4().hex} [[sim tokens=4]]"), tenant="held"
        )

    def holds() -> float:
        key = ("llm_worker_budget_holds_total", frozenset({("tenant", "held"), ("action", "hold")}))
        return scrape(worker).get(key, 0.0)

    wait_for(lambda: holds() >= 3, 30, "the job to be held three times")
    status = queued.status()
    assert status["state"] == "queued"
    assert "USD per month" in status["held"]
    assert not terminals(events_so_far(queued))

    for key in client.redis.scan_iter(match=f"{client.keys.prefix}:spend:held:*"):
        client.redis.delete(key)  # the period rolled over: nothing spent in the new one
    assert queued.result(timeout=60)["usage"]["output_tokens"] == 4
    assert "held" not in queued.status()


def cli(worker: WorkerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=ROOT,
        env=worker.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_usage_command_prints_the_exact_counters(client: Client, worker: WorkerProcess) -> None:
    """`llm-worker usage --json` shows per model and day the tokens and the exact cost that
    Redis holds for the tenant; the table ends with the total."""
    job = client.submit(make_request(f"usage {uuid.uuid4().hex} [[sim tokens=4]]"), tenant="acme")
    job.result(timeout=60)
    done = cli(worker, "usage", "--tenant", "acme", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert rows
    assert {row["tenant"] for row in rows} == {"acme"}
    fields = usage_fields(client, "acme")
    for row in rows:
        model = row["model"]
        assert row["output_tokens"] == fields[f"{model}|output_tokens"]
        assert Decimal(row["cost_usd"]) * 10**12 == fields[f"{model}|cost_pusd"]
    table = cli(worker, "usage", "--tenant", "acme")
    total = sum((Decimal(row["cost_usd"]) for row in rows), Decimal(0))
    assert table.stdout.splitlines()[-1].split()[-1] == str(total.normalize())


def test_submit_command_refuses_a_tenant_at_budget(client: Client, worker: WorkerProcess) -> None:
    """`llm-worker submit --tenant` for a tenant at its budget exits 2 naming the budget."""
    with contextlib.suppress(BudgetExceeded):  # spent already by an earlier test
        job = client.submit(make_request(f"t {uuid.uuid4().hex} [[sim tokens=5]]"), tenant="tight")
        job.result(timeout=60)
    done = cli(worker, "submit", "hello", "--tenant", "tight")
    assert done.returncode == 2
    assert "budget of 0.000001 USD per day" in done.stderr


def test_budget_action_fail_ends_queued_jobs_failed(redis_url: str, simulator: str) -> None:
    """With BUDGET_ACTION=fail a queued job of a tenant at its budget ends failed
    (budget_exceeded, naming the budget) and is dead-lettered, without an upstream call."""
    tag = uuid.uuid4().hex[:8]
    env = worker_env(
        redis_url,
        simulator,
        queue=f"money-fail-{tag}",
        key_prefix=f"moneyfail{tag}",
        prices=json.dumps(PRICES),
        budgets=json.dumps({"capped": {"usd_per_day": "0.000001"}}),
        budget_action="fail",
    )
    args = [sys.executable, "-m", "worker.cli", "run", "--pool", "gevent", "--concurrency", "5"]
    proc = WorkerProcess(args, env).ready()
    try:
        with Client(proc.settings()) as client:
            client.submit(
                make_request(f"cap {uuid.uuid4().hex} [[sim tokens=5]]"), tenant="capped"
            ).result(timeout=60)
            calls = len(sim_log(simulator))
            unaware = settings_from_env({k: v for k, v in env.items() if k != "LLM_WORKER_BUDGETS"})
            with Client(unaware) as producer:
                job = producer.submit(make_request(f"cap2 {uuid.uuid4().hex}"), tenant="capped")
            (events,) = finish([job])
            assert [e["type"] for e in events] == [ev.FAILED]
            error = events[-1]["error"]
            assert error["type"] == "budget_exceeded"
            assert "0.000001 USD per day" in error["message"]
            assert len(sim_log(simulator)) == calls
            dead = client.redis.xrange(client.keys.dead_letters)
            assert [fields[b"reason"] for _id, fields in dead] == [b"budget_exceeded"]
    finally:
        proc.stop()
