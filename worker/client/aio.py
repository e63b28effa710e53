"""The producer API for asyncio services: :class:`Client`'s methods, awaitable, on
``redis.asyncio``.

async with AsyncClient() as client:
    job = await client.submit(request)
    async for event in job.events(): ...
    message = await job.result(timeout=60)

Validation, ids, script arguments and outcomes come from :mod:`worker.client.core`, the code the
sync client runs; only the Redis calls differ.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import orjson
import redis.asyncio as aredis

from worker import events as ev
from worker import metrics as m
from worker.client import core as p
from worker.client.outbox import OutboxItem, Publisher, error_summary, make_publisher
from worker.connections import clients as connections
from worker.errors import JobNotFound
from worker.keys import Keys
from worker.settings import Settings
from worker.store import cancel_call, decode_hash, ending_script, load_lua, text

log = logging.getLogger("worker.client")


class AsyncClient:
    """Submits jobs and reads them back from one event loop. One per service is plenty."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        redis_url: str | None = None,
        broker_url: str | None = None,
        max_connections: int | None = None,
        connection_wait_s: float = 5.0,
        client_name: str | None = None,
    ) -> None:
        """``max_connections`` bounds the Redis connections (a request beyond them waits
        ``connection_wait_s``, then raises :class:`redis.exceptions.ConnectionError`); without
        it the pool grows with the concurrent requests."""
        self.settings = settings = p.client_settings(
            settings, redis_url=redis_url, broker_url=broker_url
        )
        m.add_model_labels(settings.catalogue.label_names())
        m.add_tenant_labels(settings.tenant_names())
        self.keys = Keys(settings.key_prefix)
        # No connection is opened here: redis.asyncio connects on first use, in the loop
        # that uses it.
        self.redis: aredis.Redis[bytes] = connections.async_redis_client(
            settings,
            max_connections=max_connections,
            wait_s=connection_wait_s,
            client_name=client_name,
        )
        self.replica_ack = connections.ReplicaAck.from_settings(settings)
        self._topology_checked = False
        self._submit = self.redis.register_script(load_lua("submit.lua"))
        self._cancel = self.redis.register_script(ending_script("cancel.lua"))
        self._same_redis = settings.effective_broker_url == str(settings.redis_url)
        # With a broker elsewhere, messages go through the queue's outbox (client/outbox.py).
        # The publishers are synchronous (kombu's AMQP client): they run in a worker thread.
        self._publisher: Publisher | None = None
        self._outbox_keys = (self.keys.outbox(settings.queue), self.keys.outbox_message)

    async def close(self) -> None:
        # types-redis predates aclose(); close() is its deprecated alias in redis-py 5+.
        await self.redis.aclose()  # type: ignore[attr-defined]
        if self._publisher is not None:
            await asyncio.to_thread(self._publisher.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- submitting ----------------------------------------------------------------------

    async def submit(
        self,
        request: Mapping[str, Any],
        *,
        job_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        priority: int | None = None,
        tenant: str | None = None,
        deadline_s: float | None = None,
        fallback_models: Sequence[str] | None = None,
    ) -> AsyncJob:
        """Validate and enqueue one job; an existing ``job_id`` with the same request returns
        that job, with a different request raises :class:`JobConflict`.

        ``priority`` 0-9, higher served first (default 5); ``tenant`` names the team the job
        belongs to (its id is then ``<tenant>/<job_id>``, so tenants' ids never collide);
        ``deadline_s`` is the job's life from now (default JOB_DEADLINE_S);
        ``fallback_models`` the models to try when this one keeps failing."""
        jobs = await self.submit_many(
            [request],
            job_ids=[job_id],
            metadata=[metadata],
            priority=priority,
            tenant=tenant,
            deadline_s=deadline_s,
            fallback_models=None if fallback_models is None else [list(fallback_models)],
        )
        return jobs[0]

    async def submit_many(
        self,
        requests: Iterable[Mapping[str, Any]],
        *,
        job_ids: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | Mapping[str, Any] | None = None,
        priority: int | Sequence[int | None] | None = None,
        tenant: str | Sequence[str | None] | None = None,
        deadline_s: float | Sequence[float | None] | None = None,
        fallback_models: Sequence[str] | Sequence[Sequence[str] | None] | None = None,
        default_priority: int = p.DEFAULT_PRIORITY,
        batch_id: str | None = None,
    ) -> list[AsyncJob]:
        """Validate every request first (one error lists every problem, nothing is written),
        then create and enqueue all of them in one pipeline. ``priority``, ``tenant``,
        ``deadline_s`` and ``fallback_models`` are one value for all or a list with one per
        request (see :meth:`submit`).

        ``batch_id`` is the gateway's (:mod:`worker.gateway.batches`): each job's end adds to
        that Message Batch's counts."""
        submission = p.prepare_submission(
            self.settings,
            requests,
            job_ids,
            metadata,
            priority=priority,
            tenant=tenant,
            deadline_s=deadline_s,
            fallback_models=fallback_models,
            default_priority=default_priority,
        )
        return await self._submit_prepared(submission, batch_id=batch_id)

    async def _submit_prepared(
        self,
        submission: p.Submission,
        *,
        batch_id: str | None = None,
    ) -> list[AsyncJob]:
        if not self._topology_checked:  # once per client, before its first write
            await connections.async_refuse_cluster(self.redis)
            self._topology_checked = True
        now = time.time()
        reads = p.budget_reads(
            self.settings, self.keys, [o.tenant for o in submission.options], now
        )
        if reads:
            values = await self.redis.mget([r.key for r in reads])
            refusal = p.budget_refusal(self.settings, reads, values, now)
            if refusal is not None:
                raise refusal
        calls = p.submit_calls(
            self.settings,
            self.keys,
            submission,
            now=now,
            same_redis=self._same_redis,
            batch_id=batch_id,
        )
        # types-redis does not know AsyncScript.sha (redis-py computes it from the text).
        submit_sha = getattr(self._submit, "sha")  # noqa: B009

        def fill(pipe: Any) -> None:
            for call in calls:
                pipe.evalsha(submit_sha, len(call.keys), *call.keys, *call.args)
            self.replica_ack.add(pipe)

        replies = await connections.async_execute_scripts(self.redis, fill, [self._submit])
        results = self.replica_ack.check(replies, p.submission_name(len(calls)))
        created = p.created_flags(calls, results)
        new_jobs = [
            (request["model"], opts.tenant)
            for request, opts, new in zip(
                submission.requests, submission.options, created, strict=True
            )
            if new
        ]
        for model, owner in new_jobs:
            m.JOBS_SUBMITTED.labels(model, owner or "").inc()
        if not self._same_redis:
            await self._send_elsewhere(p.to_publish(calls, results, created))
        over_quota = p.quota_refusal(calls, results)
        if over_quota is not None:
            raise over_quota
        return [AsyncJob(self, job_id) for job_id in submission.ids]

    async def _send_elsewhere(self, items: list[OutboxItem]) -> None:
        """As :meth:`worker.client.sync.Client._send_elsewhere`: publish, then take what the
        broker confirmed out of the outbox; the rest waits there for a worker's sweeper."""
        if not items:
            return
        if self._publisher is None:
            self._publisher = make_publisher(self.settings)
        confirmed, error = await asyncio.to_thread(self._publisher.publish, items)
        if confirmed:
            outbox, message_key = self._outbox_keys
            pipe = self.redis.pipeline(transaction=True)
            pipe.zrem(outbox, *confirmed)
            pipe.delete(*(message_key(job_id) for job_id in confirmed))
            await pipe.execute()
        if error is not None:
            log.warning(
                "outbox_publish_deferred jobs=%d error=%s (a worker's sweeper publishes them)",
                len(items) - len(confirmed),
                error_summary(error, self.settings.effective_broker_url),
            )

    # -- reading -------------------------------------------------------------------------

    async def get(self, job_id: str, *, tenant: str | None = None) -> AsyncJob:
        """The handle of an existing job; :class:`JobNotFound` when there is none.

        ``job_id`` as :meth:`submit` gave it (``<tenant>/<id>`` for a tenant's job), or the
        plain id with its ``tenant``."""
        if tenant is not None:
            if not p.valid_tenant(tenant) or not p.valid_job_id(job_id):
                raise JobNotFound(str(job_id))
            job_id = p.qualified_id(tenant, job_id)
        if not p.valid_qualified_id(job_id):
            raise JobNotFound(str(job_id))
        if not await self.redis.exists(self.keys.job(job_id)):
            raise JobNotFound(job_id)
        return AsyncJob(self, job_id)

    async def job_hash(self, job_id: str) -> dict[str, str] | None:
        return decode_hash(await self.redis.hgetall(self.keys.job(job_id)))


class AsyncJob:
    """A handle on one job. Cheap: it holds only the id."""

    def __init__(self, client: AsyncClient, job_id: str) -> None:
        self.client = client
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"AsyncJob({self.job_id!r})"

    @property
    def tenant(self) -> str | None:
        """The tenant the job belongs to (from its id), or None."""
        return p.split_qualified_id(self.job_id)[0]

    async def status(self) -> dict[str, Any]:
        """The job hash: ``state``, ``attempts``, timestamps, ``model``, ``usage``, ``error``…"""
        raw = await self.client.job_hash(self.job_id)
        if raw is None:
            raise JobNotFound(self.job_id)
        return p.parse_status(self.job_id, raw)

    async def cancel(self) -> bool:
        """Ask the job to stop (see :meth:`worker.client.sync.Job.cancel`); False when it had
        ended already."""
        c = self.client
        keys, args = cancel_call(c.keys, self.job_id, result_ttl_s=c.settings.result_ttl_s)
        if not c.replica_ack:
            return p.cancel_result(self.job_id, text(await c._cancel(keys=keys, args=args)))

        async def fill(pipe: Any) -> None:
            await c._cancel(keys=keys, args=args, client=pipe)
            c.replica_ack.add(pipe)

        replies = await connections.async_execute_pipeline(c.redis, fill)
        results = c.replica_ack.check(replies, f"the cancel of job {self.job_id!r}")
        return p.cancel_result(self.job_id, text(results[0]))

    # The sync client's signature, kept on purpose: one API for both (ASYNC109 would have
    # callers wrap every call in asyncio.timeout instead).
    async def events(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        after: str = "0-0",
    ) -> AsyncIterator[dict[str, Any]]:
        """Every event of the job in order, from the start (or after the stream id ``after``),
        following it live until the terminal event. ``timeout`` bounds the whole wait."""
        async for batch in self.event_batches(timeout=timeout, after=after):
            for event in batch:
                yield event

    async def event_batches(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        after: str = "0-0",
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """As :meth:`events`, a list per read: the events that arrived together (a relay
        sends them in one write, not one per event)."""
        r = self.client.redis
        keys = self.client.keys
        stream = keys.events(self.job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        last_id = after
        seen = p.SeqTracker()
        checked_exists = False
        while True:
            block_ms = p.READ_BLOCK_MS
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {self.job_id} did not end within {timeout} s")
                block_ms = max(1, min(block_ms, int(left * 1000)))
            reply = await r.xread({stream: last_id}, count=1000, block=block_ms)
            if not reply:
                if (not checked_exists or not await r.exists(keys.job(self.job_id))) and (
                    not await r.exists(keys.job(self.job_id), stream)
                ):
                    raise JobNotFound(self.job_id)
                checked_exists = True
                continue
            batch = []
            for entry_id, fields in reply[0][1]:
                event = p.event_from_entry(entry_id, fields)
                last_id = event["stream_id"]
                if p.is_repeat(event, seen):
                    continue
                batch.append(event)
                if ev.is_terminal(event):
                    yield batch
                    return
            if batch:
                yield batch

    async def result(self, timeout: float | None = None) -> dict[str, Any]:  # noqa: ASYNC109
        """The final message; raises JobFailed (or JobCancelled, JobExpired) or TimeoutError."""
        c = self.client
        raw = await c.job_hash(self.job_id)
        if raw is None and not await c.redis.exists(c.keys.events(self.job_id)):
            raise JobNotFound(self.job_id)
        if raw and raw.get("state") == ev.COMPLETED:
            stored = await c.redis.get(c.keys.result(self.job_id))
            if stored is not None:
                message: dict[str, Any] = orjson.loads(stored)
                return message
        async for event in self.events(timeout=timeout):
            if ev.is_terminal(event):
                return p.outcome(self.job_id, event)
        raise JobNotFound(self.job_id)  # the stream expired under us
