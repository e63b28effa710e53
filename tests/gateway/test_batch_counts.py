"""A batch's request counts are kept as its jobs end, so retrieve and list cost the same for
any number of requests, and the counts equal what the jobs' states say."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis

from tests.support import make_request
from worker import events as ev
from worker.client import batch_file as b
from worker.client.aio import AsyncClient
from worker.client.core import qualified_id
from worker.dev.embedded import EmbeddedRedis
from worker.gateway.batches import BatchStore, parse_requests, rfc3339
from worker.keys import Keys
from worker.runtime.job_store import WorkerStore
from worker.settings import Settings, load_settings

pytestmark = pytest.mark.integration

T = TypeVar("T")
TENANT = "team-bc"
#: Commands a connection sends of its own (on connect) or that the test sends to measure.
NOT_COUNTED = frozenset({"client", "hello", "info", "config", "ping", "select"})


@pytest.fixture(scope="module")
def private_redis() -> Iterator[redis.Redis[bytes]]:
    """A Redis only this module talks to (no worker polls it), so its command counts are ours."""
    with EmbeddedRedis() as server, redis.Redis.from_url(server.url) as client:
        yield client


@pytest.fixture
def settings(private_redis: redis.Redis[bytes]) -> Settings:
    kwargs = private_redis.connection_pool.connection_kwargs
    tag = uuid.uuid4().hex[:6]
    return load_settings(
        redis_url=f"redis://{kwargs['host']}:{kwargs['port']}/0",
        key_prefix=f"llmw-bc-{tag}",
        queue=f"bc-{tag}",
    )


def with_store(settings: Settings, use: Callable[[BatchStore], Awaitable[T]]) -> T:
    async def main() -> T:
        async with AsyncClient(settings) as client:
            return await use(BatchStore(client))

    return asyncio.run(main())


def create(settings: Settings, n: int) -> str:
    async def use(store: BatchStore) -> str:
        body = {
            "requests": [
                {"custom_id": f"r{i}", "params": make_request(f"q {i}", stream=False)}
                for i in range(n)
            ]
        }
        return await store.create(parse_requests(store.client, body), tenant=TENANT)

    return with_store(settings, use)


def retrieve(settings: Settings, batch_id: str) -> dict[str, Any]:
    async def use(store: BatchStore) -> dict[str, Any] | None:
        return await store.retrieve(batch_id, "http://gw", TENANT)

    batch = with_store(settings, use)
    assert batch is not None
    return batch


def end(store: WorkerStore, job_id: str, state: str) -> bool:
    error = None if state == ev.COMPLETED else {"type": state, "message": state}
    return store.finish(job_id, ev.make_event(job_id, 1, 1, state), error=error)


def commands(r: redis.Redis[bytes]) -> dict[str, int]:
    """Commands Redis ran since the last reset, by name (the test's own left out)."""
    stats = r.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return {name: n for name, n in calls.items() if name.split("|")[0] not in NOT_COUNTED}


def test_counts_follow_each_end_once_and_match_the_job_states(
    settings: Settings, private_redis: redis.Redis[bytes]
) -> None:
    """Each outcome counts once, by the script that ends the job (a second end or a cancel of
    an ended job adds nothing); the counts equal the states, and ended_at is the last end."""
    keys = Keys(settings.key_prefix)
    store = WorkerStore(private_redis, keys, result_ttl_s=settings.result_ttl_s)
    batch_id = create(settings, 6)
    job = [qualified_id(TENANT, b.job_id_for(batch_id, f"r{i}")) for i in range(6)]
    assert private_redis.hget(keys.job(job[0]), "batch") == batch_id.encode()
    assert end(store, job[0], ev.COMPLETED) is True
    assert end(store, job[1], ev.FAILED) is True
    assert end(store, job[2], ev.EXPIRED) is True
    assert store.cancel(job[3]) == "cancelled"
    assert end(store, job[4], ev.COMPLETED) is True
    assert end(store, job[4], ev.FAILED) is False
    assert store.cancel(job[4]) == "ended:completed"

    batch = retrieve(settings, batch_id)
    assert batch["request_counts"] == {
        "processing": 1,
        "succeeded": 2,
        "errored": 1,
        "canceled": 1,
        "expired": 1,
    }
    assert (batch["processing_status"], batch["ended_at"]) == ("in_progress", None)

    assert end(store, job[5], ev.COMPLETED) is True
    batch = retrieve(settings, batch_id)
    states = [private_redis.hmget(keys.job(j), ["state", "finished_at"]) for j in job]
    from_states = dict.fromkeys(("processing", *b.RESULT_TYPES), 0)
    for state, _ in states:
        from_states[b.result_type(state.decode()) or "processing"] += 1
    assert batch["request_counts"] == from_states
    assert batch["processing_status"] == "ended"
    assert batch["ended_at"] == rfc3339(max(float(f) for _, f in states))
    batch_ttl = private_redis.ttl(keys.batch(batch_id))
    assert 0 < batch_ttl - 1 <= private_redis.ttl(keys.batch_counts(batch_id)) <= batch_ttl


def test_retrieve_and_list_cost_the_same_for_any_batch_size(
    settings: Settings, private_redis: redis.Redis[bytes]
) -> None:
    """retrieve() runs the same Redis commands for a batch of 2 requests as for 2,000, and a
    list page a fixed number per batch: no command per request."""
    keys = Keys(settings.key_prefix)
    store = WorkerStore(private_redis, keys, result_ttl_s=settings.result_ttl_s)
    small, large = create(settings, 2), create(settings, 2_000)
    for i in range(0, 2_000, 3):
        end(store, qualified_id(TENANT, b.job_id_for(large, f"r{i}")), ev.COMPLETED)

    def measured(use: Callable[[BatchStore], Awaitable[Any]]) -> tuple[Any, dict[str, int]]:
        async def main(store: BatchStore) -> tuple[Any, dict[str, int]]:
            await store.redis.ping()  # connect first: a new connection sends commands of its own
            private_redis.config_resetstat()
            value = await use(store)
            return value, commands(private_redis)

        return with_store(settings, main)

    small_batch, small_cost = measured(lambda s: s.retrieve(small, "http://gw", TENANT))
    large_batch, large_cost = measured(lambda s: s.retrieve(large, "http://gw", TENANT))
    assert small_batch["request_counts"]["processing"] == 2
    assert large_batch["request_counts"]["succeeded"] == 667
    assert small_cost == large_cost == {"hgetall": 2}

    page, page_cost = measured(
        lambda s: s.list_page("http://gw", TENANT, limit=20, before_id=None, after_id=None)
    )
    assert [x["id"] for x in page["data"]] == [large, small]
    assert page_cost == {"zremrangebyscore": 1, "zrevrange": 1, "hgetall": 4}


def test_an_end_before_the_batch_is_recorded_keeps_no_key_for_ever(
    settings: Settings, private_redis: redis.Redis[bytes]
) -> None:
    """A counts hash that a job's end creates before (or after) its batch exists expires."""
    keys = Keys(settings.key_prefix)
    store = WorkerStore(private_redis, keys, result_ttl_s=settings.result_ttl_s)

    async def submit(batch: BatchStore) -> None:
        await batch.client.submit(make_request("alone", stream=False), job_id="one")
        await batch.client.submit_many(
            [make_request("early", stream=False)], job_ids=["two"], batch_id="msgbatch_early"
        )

    with_store(settings, submit)
    assert end(store, "one", ev.COMPLETED) is True
    assert private_redis.hget(keys.job("one"), "batch") is None
    assert end(store, "two", ev.COMPLETED) is True
    counts = keys.batch_counts("msgbatch_early")
    assert private_redis.hget(counts, "completed") == b"1"
    assert 0 < private_redis.ttl(counts) <= settings.result_ttl_s
