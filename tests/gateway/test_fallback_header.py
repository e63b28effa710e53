"""The gateway's `llm-worker-fallback-models` header, and its answer to a tenant at budget."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.gateway.test_http import GATEWAY_KEY, GATEWAY_TENANT, start_gateway
from tests.support import WorkerProcess, make_request, new_keys, stop_process, written_keys
from worker.client.sync import Client
from worker.errors import BudgetExceeded, JobConflict, RequestInvalid
from worker.gateway.app import submit_problem

DOWN = "deepseek-ai/DeepSeek-V3"
UP = "moonshotai/Kimi-K2-Instruct"


@pytest.fixture(scope="module")
def gateway_url(worker: WorkerProcess) -> Iterator[str]:
    proc, url = start_gateway(worker)
    yield url
    stop_process(proc)


@pytest.mark.integration
def test_fallback_header_reaches_the_job_and_the_fallback_answers(
    gateway_url: str, client: Client
) -> None:
    """With its model down, a job given `llm-worker-fallback-models` is answered by the
    fallback; the job records the list and the model that answered."""
    job_id = f"gw-fallback-{uuid.uuid4().hex[:8]}"
    prompt = f"gw {uuid.uuid4().hex} [[sim tokens=4 fault=529 fault_model={DOWN}]]"
    response = httpx.post(
        f"{gateway_url}/v1/messages",
        json=make_request(prompt, stream=False),
        headers={
            "x-api-key": GATEWAY_KEY,
            "llm-worker-job-id": job_id,
            "llm-worker-fallback-models": f"{UP},,",
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == UP
    status = client.get(job_id, tenant=GATEWAY_TENANT).status()
    assert status["fallback_models"] == [UP]
    assert status["answered_by"] == UP


@pytest.mark.integration
def test_too_many_fallbacks_in_the_header_are_a_400(gateway_url: str, client: Client) -> None:
    """Nine fallback models are refused by name, and nothing is enqueued."""
    before, queued = written_keys(client), client.redis.llen(client.settings.queue)
    bad = httpx.post(
        f"{gateway_url}/v1/messages",
        json=make_request("x"),
        headers={
            "x-api-key": GATEWAY_KEY,
            "llm-worker-fallback-models": ",".join(f"m{i}" for i in range(9)),
        },
        timeout=30,
    )
    assert bad.status_code == 400, bad.text
    assert "fallback_models" in bad.json()["error"]["message"]
    assert new_keys(client, before, queued) == set()


def test_refused_submissions_map_to_their_http_answers() -> None:
    """A tenant at its budget is a 429 rate_limit_error naming the budget; invalid is 400;
    a reused job id 409."""
    budget = submit_problem(BudgetExceeded("acme", "tenant 'acme' has reached its budget"))
    assert (budget.status, budget.error_type) == (429, "rate_limit_error")
    assert "budget" in budget.message
    invalid = submit_problem(RequestInvalid([{"loc": "model", "msg": "bad"}]))
    assert (invalid.status, invalid.error_type) == (400, "invalid_request_error")
    assert submit_problem(JobConflict("j")).status == 409
