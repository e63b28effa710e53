"""Message Batches on Redis, for the gateway: a batch is a hash, the list of its custom_ids,
a hash of counts, and one job per request whose id derives from both
(:func:`worker.client.batch_file.job_id_for`).

Each job records its batch (field ``batch``), and the Lua step that ends a job adds to the
batch's counts (``worker/lua/batch_end.lua``): the counts cannot drift from what ran, and
retrieving or listing a batch reads two hashes, whatever its size.

A batch belongs to the tenant that created it (field ``tenant``; its jobs are that tenant's,
``<tenant>/<job id>``): every read answers as if another tenant's batch did not exist, and a
tenant's list is its own index (:meth:`worker.keys.Keys.tenant_batches`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from worker import events as ev
from worker.client import batch_file as b
from worker.client import core as p
from worker.client.aio import AsyncClient
from worker.errors import JobNotFound, QuotaExceeded, RequestInvalid
from worker.store import decode_hash, text

MAX_REQUESTS = 100_000
SUBMIT_CHUNK = 500
READ_CHUNK = 1_000
#: Anthropic keeps a batch open for 24 hours; ours end sooner or at the job deadline.


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def parse_requests(client: AsyncClient, body: Any) -> list[b.BatchItem]:
    """A create body's requests, or :class:`RequestInvalid` naming each bad one by index."""
    requests = body.get("requests") if isinstance(body, Mapping) else None
    if not isinstance(requests, list) or not requests:
        raise RequestInvalid([{"loc": "requests", "msg": "a non-empty list is required"}])
    errors: list[dict[str, str]] = []
    unknown = sorted(set(body) - {"requests"})
    if unknown:
        errors.append({"loc": "(body)", "msg": f"unknown fields: {', '.join(unknown)}"})
    if len(requests) > MAX_REQUESTS:
        errors.append({"loc": "requests", "msg": f"at most {MAX_REQUESTS} requests"})
    items: list[b.BatchItem] = []
    seen: dict[str, int] = {}
    for index, data in enumerate(requests):
        item, problems = b.parse_item(client.settings, data, f"requests[{index}].")
        errors.extend(problems)
        if item is None:
            continue
        if item.custom_id in seen:
            errors.append(
                {
                    "loc": f"requests[{index}].custom_id",
                    "msg": f"{item.custom_id!r} repeats requests[{seen[item.custom_id]}]",
                }
            )
            continue  # a third copy names the first, as `llm-worker batch` does
        seen[item.custom_id] = index
        items.append(b.BatchItem(index, item.custom_id, item.params))
    if errors:
        raise RequestInvalid(errors)
    return items


def valid_batch_id(batch_id: str) -> bool:
    return batch_id.startswith("msgbatch_") and p.valid_job_id(batch_id)


def request_counts(total: int, ended: Mapping[str, str]) -> dict[str, int]:
    """Anthropic's ``request_counts`` from a batch's counts hash (ends by job state)."""
    counts = dict.fromkeys(("processing", *b.RESULT_TYPES), 0)
    for state, count in ended.items():
        kind = b.result_type(state)
        if kind is not None:
            counts[kind] += int(count)
    counts["processing"] = max(0, total - sum(counts.values()))
    return counts


def message_batch(
    batch_id: str, meta: Mapping[str, str], ended: Mapping[str, str], base_url: str
) -> dict[str, Any]:
    """Anthropic's ``MessageBatch`` object from the batch hash and its counts hash."""
    counts = request_counts(int(ended.get("total") or meta["count"]), ended)
    created_at = float(meta["created_at"])
    cancel_at = float(meta["cancel_initiated_at"]) if meta.get("cancel_initiated_at") else None
    status = "ended"
    if counts["processing"]:
        status = "canceling" if cancel_at else "in_progress"
    return {
        "id": batch_id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": counts,
        "ended_at": rfc3339(float(ended.get("ended_at") or created_at))
        if status == "ended"
        else None,
        "created_at": rfc3339(created_at),
        "expires_at": rfc3339(float(meta["expires_at"])),
        "archived_at": None,
        "cancel_initiated_at": rfc3339(cancel_at),
        "results_url": (
            f"{base_url}/v1/messages/batches/{batch_id}/results" if status == "ended" else None
        ),
    }


class BatchStore:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.keys = client.keys
        self.redis = client.redis
        self.deadline_s = client.settings.gateway_batch_deadline_s
        self.ttl_s = int(self.deadline_s + client.settings.result_ttl_s)

    def _job_id(self, tenant: str, batch_id: str, custom_id: str) -> str:
        """The Redis id of a batch request's job."""
        return p.qualified_id(tenant, b.job_id_for(batch_id, custom_id))

    async def _check_quota(self, tenant: str, count: int) -> None:
        """:class:`QuotaExceeded` before anything is written when ``count`` more queued jobs
        would not fit the tenant's quota (``submit.lua`` still holds the line per job)."""
        limit = self.client.settings.max_queued_for(tenant)
        if limit is None:
            return
        key = self.keys.tenant_queued(tenant)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zremrangebyscore(key, "-inf", time.time())
        pipe.zcard(key)
        queued = int((await pipe.execute())[1])
        if queued + count > limit:
            raise QuotaExceeded(tenant, limit, [], [])

    async def create(
        self, items: list[b.BatchItem], *, tenant: str, priority: int | None = None
    ) -> str:
        """Submit every request as a job of ``tenant``, then record the batch. Returns its id.

        A batch that does not fit the tenant's queued quota is refused whole: nothing is
        written (or, when other submits raced it past the quota, what was written is
        cancelled) and :class:`QuotaExceeded` is raised."""
        await self._check_quota(tenant, len(items))
        batch_id = "msgbatch_" + uuid.uuid4().hex[:24]
        created: list[str] = []
        for start in range(0, len(items), SUBMIT_CHUNK):
            chunk = items[start : start + SUBMIT_CHUNK]
            try:
                jobs = await self.client.submit_many(
                    [item.params for item in chunk],
                    job_ids=[b.job_id_for(batch_id, item.custom_id) for item in chunk],
                    metadata=[{"batch_id": batch_id, "custom_id": i.custom_id} for i in chunk],
                    batch_id=batch_id,
                    deadline_s=self.deadline_s,
                    priority=priority,
                    tenant=tenant,
                    default_priority=p.BATCH_PRIORITY,
                )
            except QuotaExceeded as exc:
                for job_id in [*created, *exc.created]:
                    with contextlib.suppress(JobNotFound):
                        await (await self.client.get(job_id)).cancel()
                raise
            created.extend(job.job_id for job in jobs)
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            self.keys.batch(batch_id),
            mapping={
                "created_at": now,
                "expires_at": now + self.deadline_s,
                "count": len(items),
                "tenant": tenant,
            },
        )
        pipe.rpush(self.keys.batch_items(batch_id), *[item.custom_id for item in items])
        # Jobs may have ended (and counted) already. `total` also makes the counts hash exist
        # now, so that it has the batch's TTL even before any job ends.
        pipe.hset(self.keys.batch_counts(batch_id), "total", len(items))
        pipe.zadd(self.keys.tenant_batches(tenant), {batch_id: now})
        pipe.expire(self.keys.tenant_batches(tenant), self.ttl_s)
        for key in (
            self.keys.batch(batch_id),
            self.keys.batch_items(batch_id),
            self.keys.batch_counts(batch_id),
        ):
            pipe.expire(key, self.ttl_s)
        await pipe.execute()
        return batch_id

    async def _meta(self, batch_id: str, tenant: str) -> dict[str, str] | None:
        """The batch's hash when it exists and is ``tenant``'s, else None."""
        if not valid_batch_id(batch_id):
            return None
        meta = decode_hash(await self.redis.hgetall(self.keys.batch(batch_id)))
        if meta is None or meta.get("tenant") != tenant:
            return None
        return meta

    async def _custom_ids(self, batch_id: str) -> list[str]:
        return [text(c) for c in await self.redis.lrange(self.keys.batch_items(batch_id), 0, -1)]

    async def _states(
        self, tenant: str, batch_id: str, custom_ids: list[str]
    ) -> list[tuple[str | None, str]]:
        out: list[tuple[str | None, str]] = []
        for start in range(0, len(custom_ids), READ_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for custom_id in custom_ids[start : start + READ_CHUNK]:
                pipe.hmget(
                    self.keys.job(self._job_id(tenant, batch_id, custom_id)),
                    ["state", "finished_at"],
                )
            for state, finished in await pipe.execute():
                out.append((text(state) if state else None, text(finished) if finished else ""))
        return out

    async def retrieve(self, batch_id: str, base_url: str, tenant: str) -> dict[str, Any] | None:
        """Anthropic's ``MessageBatch`` object, or None when ``tenant`` has no such batch."""
        return (await self._batches([batch_id], base_url, tenant)).get(batch_id)

    async def _batches(
        self, batch_ids: list[str], base_url: str, tenant: str
    ) -> dict[str, dict[str, Any]]:
        """``tenant``'s batches among ``batch_ids``, by id, read in one round trip of two
        commands per batch (its hash and its counts), whatever the number of its requests."""
        wanted = [batch_id for batch_id in batch_ids if valid_batch_id(batch_id)]
        if not wanted:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for batch_id in wanted:
            pipe.hgetall(self.keys.batch(batch_id))
            pipe.hgetall(self.keys.batch_counts(batch_id))
        replies = await pipe.execute()
        found = {}
        for index, batch_id in enumerate(wanted):
            meta = decode_hash(replies[2 * index])
            if meta is not None and meta.get("tenant") == tenant:
                ended = decode_hash(replies[2 * index + 1]) or {}
                found[batch_id] = message_batch(batch_id, meta, ended, base_url)
        return found

    async def list_page(
        self,
        base_url: str,
        tenant: str,
        *,
        limit: int,
        before_id: str | None,
        after_id: str | None,
    ) -> dict[str, Any]:
        """``tenant``'s batches, newest first, paged the way Anthropic's list is (``after_id``
        goes older)."""
        index = self.keys.tenant_batches(tenant)
        # A batch's hash and items expire; its id here would page over nothing (short pages
        # that say has_more, and a last_id of None that stops a client's auto-paging).
        await self.redis.zremrangebyscore(index, "-inf", time.time() - self.ttl_s)
        ids = [text(x) for x in await self.redis.zrevrange(index, 0, -1)]
        if after_id is not None:
            start = ids.index(after_id) + 1 if after_id in ids else len(ids)
            page, has_more = ids[start : start + limit], start + limit < len(ids)
        elif before_id is not None:
            end = ids.index(before_id) if before_id in ids else 0
            page, has_more = ids[max(0, end - limit) : end], end - limit > 0
        else:
            page, has_more = ids[:limit], limit < len(ids)
        found = await self._batches(page, base_url, tenant)
        data = [found[batch_id] for batch_id in page if batch_id in found]
        return {
            "data": data,
            "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }

    async def cancel(self, batch_id: str, tenant: str) -> bool:
        """Cancel every request not yet ended; False when ``tenant`` has no such batch."""
        if await self._meta(batch_id, tenant) is None:
            return False
        await self.redis.hsetnx(self.keys.batch(batch_id), "cancel_initiated_at", time.time())
        custom_ids = await self._custom_ids(batch_id)
        states = await self._states(tenant, batch_id, custom_ids)
        for custom_id, (state, _) in zip(custom_ids, states, strict=True):
            if state in {ev.QUEUED, ev.RUNNING}:
                with contextlib.suppress(JobNotFound):  # expired in between
                    job = await self.client.get(self._job_id(tenant, batch_id, custom_id))
                    await job.cancel()
        return True

    async def results(self, batch_id: str, tenant: str) -> AsyncIterator[bytes]:
        """The results JSONL of ``tenant``'s batch, in request order (nothing when the batch
        is not ``tenant``'s)."""
        if await self._meta(batch_id, tenant) is None:
            return
        custom_ids = await self._custom_ids(batch_id)
        for start in range(0, len(custom_ids), READ_CHUNK):
            chunk = custom_ids[start : start + READ_CHUNK]
            pipe = self.redis.pipeline(transaction=False)
            for custom_id in chunk:
                job_id = self._job_id(tenant, batch_id, custom_id)
                pipe.hmget(self.keys.job(job_id), ["state", "error"])
                pipe.get(self.keys.result(job_id))
            replies = await pipe.execute()
            lines = []
            for index, custom_id in enumerate(chunk):
                state, error = replies[2 * index]
                stored = replies[2 * index + 1]
                result = b.batch_result(
                    text(state) if state else "expired",
                    orjson.loads(stored) if stored else None,
                    orjson.loads(error) if error else None,
                    upstream=self.client.settings.upstream_name,
                ) or {"type": "expired"}
                lines.append(b.result_line(custom_id, result))
            yield b"".join(lines)
