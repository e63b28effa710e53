"""The gateway's batch list forgets batches whose records expired."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from worker.client.aio import AsyncClient
from worker.gateway.batches import BatchStore
from worker.settings import load_settings

pytestmark = pytest.mark.integration


def test_expired_batches_leave_the_list(redis_url: str) -> None:
    settings = load_settings(
        redis_url=redis_url,
        key_prefix=f"llmw-bl-{uuid.uuid4().hex[:6]}",
        result_ttl_s=5,
        gateway_batch_deadline_s=100,  # a batch lives 100 s + the result TTL
        lease_ttl_s=1,  # a result TTL of 5 s must exceed twice the visibility timeout
        visibility_timeout_s=2,
    )

    async def main() -> tuple[list[str], bool, int]:
        async with AsyncClient(settings) as client:
            store = BatchStore(client)
            # A batch recorded longer ago than its records live: its hash and items are gone.
            index = client.keys.tenant_batches("team-a")
            await client.redis.zadd(index, {"msgbatch_gone": time.time() - 10_000})
            page = await store.list_page(
                "http://gw", "team-a", limit=20, before_id=None, after_id=None
            )
            left = await client.redis.zcard(index)
            return [b["id"] for b in page["data"]], page["has_more"], left

    ids, has_more, left = asyncio.run(main())
    assert (ids, has_more, left) == ([], False, 0)
