"""``llm-worker dlq list | requeue | purge`` as real subprocesses, and the Python API behind it."""

from __future__ import annotations

import hashlib
import json
import uuid

import orjson
import pytest

from tests.core.test_cli import cli
from tests.support import WorkerProcess, make_request, worker_env
from worker.client.dead_letters import DeadLetterError, DeadLetters
from worker.client.sync import Client
from worker.errors import JobFailed
from worker.keys import Keys
from worker.runtime.job_store import WorkerStore

pytestmark = pytest.mark.integration


@pytest.fixture
def isolated(redis_url: str, simulator_url: str) -> tuple[dict[str, str], Client]:
    """A key prefix of its own, so that purging everything touches no other test's letters."""
    env = worker_env(redis_url, simulator_url, key_prefix=f"llmw-dlq-{uuid.uuid4().hex[:6]}")
    from worker.settings import settings_from_env

    return env, Client(settings_from_env(env))


def _dead_letter(client: Client, *, job_id: str, reason: str, payload: object) -> None:
    """Write a dead letter as a worker does."""
    store = WorkerStore(client.redis, client.keys, result_ttl_s=60)
    store.dead_letter(job_id=job_id, reason=reason, payload=payload)


def test_a_failed_job_is_listed_requeued_as_a_new_job_and_completes(
    worker: WorkerProcess, client: Client
) -> None:
    """A job that failed after every attempt is in `dlq list`; `dlq requeue ID` submits its
    request again as a new job (linked by metadata) that completes, and drops the entry."""
    attempts = client.settings.max_attempts
    job_id = f"dlq-{uuid.uuid4().hex}"
    prompt = f"{job_id} [[sim tokens=4 fault=503 fault_times={attempts}]]"
    with pytest.raises(JobFailed):
        client.submit(make_request(prompt), job_id=job_id).result(timeout=60)

    listed = cli("dlq", "list", "--json", env=worker.env)
    assert listed.returncode == 0, listed.stderr
    entries = [json.loads(line) for line in listed.stdout.splitlines()]
    entry = next(e for e in entries if e["job_id"] == job_id)
    assert entry["reason"] == "http_503"
    assert entry["payload"]["request"]["messages"][0]["content"] == prompt
    table = cli("dlq", "list", "--reason", "http_503", env=worker.env)
    assert entry["id"] in table.stdout

    requeued = cli("dlq", "requeue", entry["id"], env=worker.env)
    assert requeued.returncode == 0, requeued.stderr
    new_id = requeued.stdout.split("requeued as ")[1].split()[0]
    new_job = client.get(new_id)
    assert new_job.result(timeout=60)["usage"]["output_tokens"] == 4  # the fault is used up
    assert new_job.status()["metadata"] == {"requeued_from": job_id, "dead_letter": entry["id"]}
    remaining = [
        json.loads(x)["id"]
        for x in cli("dlq", "list", "--json", env=worker.env).stdout.splitlines()
    ]
    assert entry["id"] not in remaining


def test_requeue_keeps_an_entry_that_is_not_a_job(isolated: tuple[dict[str, str], Client]) -> None:
    """Raw garbage cannot be requeued: it stays, and the command says why and exits 1."""
    env, client = isolated
    _dead_letter(client, job_id="", reason="unreadable_queue_item", payload="not json {")
    entry_id = DeadLetters(client).entries()[0].entry_id
    result = cli("dlq", "requeue", "--all", env=env)
    assert result.returncode == 1
    assert f"{entry_id}: kept: the payload is not a job request" in result.stderr
    assert len(DeadLetters(client)) == 1


def test_a_tenants_dead_letter_comes_back_as_that_tenants_job(
    isolated: tuple[dict[str, str], Client],
) -> None:
    """Requeueing a tenant's dead job makes a new job of the same tenant (its limits, quota
    and usage stay its own)."""
    _env, client = isolated
    payload = {"job_id": "team-d/old", "request": make_request("again"), "tenant": "team-d"}
    _dead_letter(client, job_id="team-d/old", reason="http_503", payload=payload)
    (outcome,) = DeadLetters(client).requeue(DeadLetters(client).entries())
    assert outcome.job is not None
    assert outcome.job.job_id.startswith("team-d/")
    assert outcome.job.status()["tenant"] == "team-d"
    outcome.job.cancel()


def test_purge_by_id_by_reason_and_all(isolated: tuple[dict[str, str], Client]) -> None:
    """purge removes exactly what it names; --all needs --yes."""
    env, client = isolated
    for reason in ("http_400", "http_400", "delivery_limit"):
        _dead_letter(client, job_id="j", reason=reason, payload={"job_id": "j"})
    dead = DeadLetters(client)
    first = dead.entries()[0].entry_id

    assert cli("dlq", "purge", first, env=env).stdout.strip() == "purged 1 dead letters"
    assert len(dead) == 2
    refused = cli("dlq", "purge", "--all", env=env)
    assert refused.returncode == 2
    assert "needs --yes" in refused.stderr
    assert len(dead) == 2
    by_reason = cli("dlq", "purge", "--all", "--reason", "http_400", "--yes", env=env)
    assert by_reason.stdout.strip() == "purged 1 dead letters"
    assert [e.reason for e in dead.entries()] == ["delivery_limit"]
    assert cli("dlq", "purge", "--all", "--yes", env=env).returncode == 0
    assert len(dead) == 0
    assert not client.redis.exists(Keys(client.settings.key_prefix).dead_letters)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("requeue",), "name dead-letter ids, or --all"),
        (("requeue", "1-0", "--all"), "name dead-letter ids, or --all"),
        (("purge", "banana"), "not a dead-letter id"),
        (("requeue", "1-0"), "no dead letter with id 1-0"),
        (("purge", "1-0", "--reason", "x"), "--reason selects with --all"),
    ],
)
def test_bad_dlq_arguments_are_refused_with_a_reason(
    isolated: tuple[dict[str, str], Client], args: tuple[str, ...], message: str
) -> None:
    env, client = isolated
    _dead_letter(client, job_id="j", reason="r", payload={"job_id": "j"})
    result = cli("dlq", *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(DeadLetters(client)) == 1  # nothing was touched


def test_python_api_get_names_every_unknown_id(isolated: tuple[dict[str, str], Client]) -> None:
    _env, client = isolated
    with pytest.raises(DeadLetterError, match="1-0, 2-0"):
        DeadLetters(client).get(["1-0", "2-0"])


def test_listing_reads_page_by_page_and_filters_across_pages(
    isolated: tuple[dict[str, str], Client],
) -> None:
    """1,200 letters (three pages): a limit reads the oldest first, and a reason filter finds
    every match across page boundaries."""
    _env, client = isolated
    pipe = client.redis.pipeline(transaction=False)
    for i in range(1_200):
        reason = "rare" if i % 400 == 399 else "common"
        pipe.xadd(client.keys.dead_letters, {"job_id": f"j{i}", "reason": reason, "payload": "{}"})
    pipe.execute()
    dead = DeadLetters(client)
    assert [e.job_id for e in dead.entries(limit=3)] == ["j0", "j1", "j2"]
    assert [e.job_id for e in dead.entries(reason="rare")] == ["j399", "j799", "j1199"]
    assert len(dead.entries()) == 1_200


def test_a_large_payload_is_kept_as_its_length_hash_and_head(
    isolated: tuple[dict[str, str], Client],
) -> None:
    """Past DEAD_LETTER_PAYLOAD_BYTES a payload is stored as a note (bytes, sha256, head), so
    the stream's memory stays bounded; requeue reports it instead of sending half a request."""
    _env, client = isolated
    store = WorkerStore(client.redis, client.keys, result_ttl_s=60, dead_letter_payload_bytes=2048)
    payload = {"job_id": "big", "request": make_request("x" * 10_000)}
    store.dead_letter(job_id="big", reason="http_400", payload=payload)
    (entry,) = DeadLetters(client).entries()
    stored = json.loads(entry.payload)
    raw = orjson.dumps(payload)
    assert stored["truncated"] is True
    assert stored["bytes"] == len(raw)
    assert stored["sha256"] == hashlib.sha256(raw).hexdigest()
    assert len(stored["head"]) == 2048
    assert len(entry.payload) < 2048 + 200
    (outcome,) = DeadLetters(client).requeue([entry])
    assert outcome.job is None
    assert outcome.error == "the payload is not a job request"


def test_requeue_keeps_the_jobs_priority_and_tenant(
    isolated: tuple[dict[str, str], Client],
) -> None:
    """A dead letter of a tenant's priority-8 job comes back as a job of that tenant at 8; a
    payload whose class is not valid comes back with the defaults."""
    _, client = isolated
    request = make_request("classed [[sim tokens=2]]")
    payload = {"job_id": "acme/j1", "request": request, "priority": 8, "tenant": "acme"}
    _dead_letter(client, job_id="acme/j1", reason="upstream_4xx", payload=payload)
    odd = {"job_id": "j2", "request": request, "priority": 42, "tenant": "a b"}
    _dead_letter(client, job_id="j2", reason="upstream_4xx", payload=odd)
    dead = DeadLetters(client)
    outcomes = {o.entry.job_id: o for o in dead.requeue(dead.entries())}
    classed = outcomes["acme/j1"].job
    defaulted = outcomes["j2"].job
    assert classed is not None
    assert defaulted is not None
    assert classed.job_id.startswith("acme/")
    assert (classed.status()["priority"], classed.status()["tenant"]) == (8, "acme")
    assert defaulted.status()["priority"] == 5
    assert "tenant" not in defaulted.status()
