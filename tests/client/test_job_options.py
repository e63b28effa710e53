"""Job options (priority, tenant, deadline) through every producer entry point, against a real
Redis and worker: what is recorded, what two tenants' equal ids give, and bad values."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from tests.support import ROOT, WorkerProcess
from worker.client.sync import Client
from worker.errors import JobNotFound, RequestInvalid

pytestmark = pytest.mark.integration

REQUEST: dict[str, Any] = {
    "model": "deepseek-ai/DeepSeek-V3",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "Hi"}],
}


def test_the_record_shows_priority_tenant_and_deadline(client: Client) -> None:
    """A job submitted with all three options records them, and still completes."""
    job = client.submit(REQUEST, job_id="opts-1", priority=8, tenant="team-a", deadline_s=300)
    assert job.job_id == "team-a/opts-1"
    assert job.tenant == "team-a"
    job.result(timeout=60)
    status = job.status()
    assert status["priority"] == 8
    assert status["tenant"] == "team-a"
    assert status["deadline_at"] == pytest.approx(status["submitted_at"] + 300)


def test_two_tenants_may_use_the_same_job_id(client: Client) -> None:
    """The same job id under two tenants (even with different requests) makes two jobs."""
    other = {**REQUEST, "messages": [{"role": "user", "content": "Other"}]}
    a = client.submit(REQUEST, job_id="shared-id", tenant="team-a")
    b = client.submit(other, job_id="shared-id", tenant="team-b")
    assert {a.job_id, b.job_id} == {"team-a/shared-id", "team-b/shared-id"}
    a.result(timeout=60)
    b.result(timeout=60)
    assert client.get("shared-id", tenant="team-b").job_id == "team-b/shared-id"
    with pytest.raises(JobNotFound):
        client.get("shared-id", tenant="team-c")


def test_a_bad_option_writes_nothing(client: Client) -> None:
    """An out-of-range priority refuses the whole call; no job of it exists."""
    with pytest.raises(RequestInvalid) as info:
        client.submit_many([REQUEST, REQUEST], job_ids=["bad-p-1", "bad-p-2"], priority=[1, 12])
    assert [e["loc"] for e in info.value.errors] == ["requests[1].priority"]
    for job_id in ("bad-p-1", "bad-p-2"):
        with pytest.raises(JobNotFound):
            client.get(job_id)


def _cli(worker: WorkerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_WORKER_")}
    env["LLM_WORKER_REDIS_URL"] = str(worker.settings().redis_url)
    env["LLM_WORKER_QUEUE"] = worker.settings().queue
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_cli_passes_the_options_and_refuses_bad_ones(
    worker: WorkerProcess, client: Client
) -> None:
    """`submit --priority --tenant --deadline` records them; a priority of 12 exits 2 and says
    which option is wrong."""
    ok = _cli(worker, "submit", "Hi", "--priority", "7", "--tenant", "cli-t", "--deadline", "90")
    assert ok.returncode == 0, ok.stderr
    job_id = ok.stdout.strip()
    assert job_id.startswith("cli-t/")
    status = client.get(job_id).status()
    assert (status["priority"], status["tenant"]) == (7, "cli-t")
    bad = _cli(worker, "submit", "Hi", "--priority", "12")
    assert bad.returncode == 2
    assert "priority" in bad.stderr
