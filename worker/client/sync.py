"""The producer API: submit validated jobs, follow their events, read their results.

client = Client()                       # settings from the environment
job = client.submit(request)            # validated; nothing is written when invalid
for event in job.events(): ...          # replays from the start, ends at the terminal event
message = job.result(timeout=60)        # or JobFailed / JobCancelled / JobExpired / TimeoutError
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import orjson

from worker import events as ev
from worker import metrics as m
from worker.client import core as p
from worker.client.core import JOB_ID_PATTERN, MAX_METADATA_BYTES, request_sha
from worker.client.outbox import Outbox, OutboxItem, Publisher, error_summary, make_publisher
from worker.connections import clients as connections
from worker.errors import JobNotFound
from worker.keys import Keys
from worker.settings import Settings
from worker.store import JobStore, load_lua

#: Producers log through the standard library: they run inside other people's applications.
log = logging.getLogger("worker.client")

__all__ = ["JOB_ID_PATTERN", "MAX_METADATA_BYTES", "Client", "Job", "request_sha"]


class Client:
    """Submits jobs and reads them back. Thread-safe; one per process is plenty."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        redis_url: str | None = None,
        broker_url: str | None = None,
    ) -> None:
        self.settings = settings = p.client_settings(
            settings, redis_url=redis_url, broker_url=broker_url
        )
        m.add_model_labels(settings.catalogue.label_names())
        m.add_tenant_labels(settings.tenant_names())
        self.keys = Keys(self.settings.key_prefix)
        self.redis = connections.redis_client(settings)
        self.replica_ack = connections.ReplicaAck.from_settings(settings)
        self.store = JobStore(
            self.redis,
            self.keys,
            result_ttl_s=self.settings.result_ttl_s,
            replica_ack=self.replica_ack,
        )
        self._claim = self.redis.register_script(load_lua("claim.lua"))
        self._topology_checked = False
        self._same_redis = self.settings.effective_broker_url == str(self.settings.redis_url)
        # With a broker elsewhere, messages go through the queue's outbox (worker.client.outbox);
        # the publisher connects on first use.
        self.outbox = Outbox(self.redis, self.keys, self.settings.queue)
        self._publisher: Publisher | None = None
        self._publisher_lock = threading.Lock()

    def close(self) -> None:
        self.redis.close()
        if self._publisher is not None:
            self._publisher.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submitting ----------------------------------------------------------------------

    def submit(
        self,
        request: Mapping[str, Any],
        *,
        job_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        priority: int | None = None,
        tenant: str | None = None,
        deadline_s: float | None = None,
        fallback_models: Sequence[str] | None = None,
    ) -> Job:
        """Validate and enqueue one job; an existing ``job_id`` with the same request returns
        that job, with a different request raises :class:`JobConflict`.

        ``priority`` 0-9, higher served first (default 5); ``tenant`` names the team the job
        belongs to (its id is then ``<tenant>/<job_id>``, so tenants' ids never collide);
        ``deadline_s`` is the job's life from now (default JOB_DEADLINE_S);
        ``fallback_models`` the models to try when this one keeps failing."""
        return self.submit_many(
            [request],
            job_ids=[job_id],
            metadata=[metadata],
            priority=priority,
            tenant=tenant,
            deadline_s=deadline_s,
            fallback_models=None if fallback_models is None else [list(fallback_models)],
        )[0]

    def submit_many(
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
    ) -> list[Job]:
        """Validate every request first (one error lists every problem, nothing is written),
        then create and enqueue all of them in one pipeline. ``priority``, ``tenant``,
        ``deadline_s`` and ``fallback_models`` are one value for all or a list with one per
        request (see :meth:`submit`)."""
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
        ids, _payloads, _claim = self._enqueue(submission)
        return [Job(self, job_id) for job_id in ids]

    def submit_held(
        self,
        submission: p.Submission,
        claim_with: p.ClaimWith,
    ) -> tuple[str, dict[str, Any], Any]:
        """The gateway's fast-path submit of one prepared job (only with the broker on this
        Redis; see :mod:`worker.gateway.fast_path`): ``submit.lua``'s fast-path form, and in
        the same round trip the claim ``claim_with(job_id, payload)`` returns (``claim.lua``'s
        keys and arguments, guarded to take only a job whose message the outbox holds). The
        job's id, its message payload and the claim's raw reply (``not_held`` when the job was
        queued or existed already)."""
        ids, payloads, claim = self._enqueue(
            submission, fast_path=self._same_redis, claim_with=claim_with
        )
        return ids[0], payloads[0], claim

    def _enqueue(
        self,
        submission: p.Submission,
        *,
        fast_path: bool = False,
        claim_with: p.ClaimWith | None = None,
    ) -> tuple[list[str], list[dict[str, Any]], Any]:
        """Write the prepared jobs (``submit.lua`` counts the new ones in the queue's
        submitted-jobs hash): their ids, message payloads and the claim's raw reply (with
        ``claim_with``, sent in the same round trip)."""
        if not self._topology_checked:  # once per client, before its first write
            connections.refuse_cluster(self.redis)
            self._topology_checked = True
        now = time.time()
        reads = p.budget_reads(
            self.settings, self.keys, [o.tenant for o in submission.options], now
        )
        if reads:
            refusal = p.budget_refusal(
                self.settings, reads, self.redis.mget([r.key for r in reads]), now
            )
            if refusal is not None:
                raise refusal
        calls = p.submit_calls(
            self.settings,
            self.keys,
            submission,
            now=now,
            same_redis=self._same_redis,
            fast_path=fast_path,
        )
        claim = None if claim_with is None else claim_with(calls[0].job_id, calls[0].payload)
        submit, claim_script = self.store.submit_script(), self._claim
        # types-redis does not know Script.sha (redis-py computes it from the text).
        submit_sha, claim_sha = getattr(submit, "sha"), getattr(claim_script, "sha")  # noqa: B009

        def fill(pipe: Any) -> None:
            # EVALSHA straight away: a pipeline's registered scripts cost a SCRIPT EXISTS
            # round trip before every execute (see connections.execute_pipeline).
            for call in calls:
                pipe.evalsha(submit_sha, len(call.keys), *call.keys, *call.args)
            if claim is not None:
                pipe.evalsha(claim_sha, len(claim[0]), *claim[0], *claim[1])
            self.replica_ack.add(pipe)

        replies = connections.execute_pipeline(self.redis, fill, [submit, claim_script])
        results = self.replica_ack.check(replies, p.submission_name(len(calls)))
        claimed = results.pop() if claim is not None else None
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
            self._send_elsewhere(p.to_publish(calls, results, created))
        over_quota = p.quota_refusal(calls, results)
        if over_quota is not None:
            raise over_quota
        return list(submission.ids), [call.payload for call in calls], claimed

    def _send_elsewhere(self, items: list[OutboxItem]) -> None:
        """Publish what the submit left in the outbox, then take what the broker confirmed
        out of it. What the broker did not confirm stays: a worker's sweeper publishes it
        after ``OUTBOX_GRACE_S``, so the jobs are submitted either way (and say so in a log)."""
        if not items:
            return
        with self._publisher_lock:
            if self._publisher is None:
                self._publisher = make_publisher(self.settings)
        confirmed, error = self._publisher.publish(items)
        self.outbox.mark_sent(confirmed)
        if error is not None:
            log.warning(
                "outbox_publish_deferred jobs=%d error=%s (a worker's sweeper publishes them)",
                len(items) - len(confirmed),
                error_summary(error, self.settings.effective_broker_url),
            )

    # -- reading -------------------------------------------------------------------------

    def get(self, job_id: str, *, tenant: str | None = None) -> Job:
        """The handle of an existing job; :class:`JobNotFound` when there is none.

        ``job_id`` as :meth:`submit` gave it (``<tenant>/<id>`` for a tenant's job), or the
        plain id with its ``tenant``."""
        if tenant is not None:
            if not p.valid_tenant(tenant) or not p.valid_job_id(job_id):
                raise JobNotFound(str(job_id))
            job_id = p.qualified_id(tenant, job_id)
        if not p.valid_qualified_id(job_id):
            raise JobNotFound(str(job_id))
        if not self.redis.exists(self.keys.job(job_id)):
            raise JobNotFound(job_id)
        return Job(self, job_id)


class Job:
    """A handle on one job. Cheap: it holds only the id."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"Job({self.job_id!r})"

    @property
    def tenant(self) -> str | None:
        """The tenant the job belongs to (from its id), or None."""
        return p.split_qualified_id(self.job_id)[0]

    def status(self) -> dict[str, Any]:
        """The job hash: ``state``, ``attempts``, timestamps, ``model``, ``usage``, ``error``…"""
        raw = self.client.store.job_hash(self.job_id)
        if raw is None:
            raise JobNotFound(self.job_id)
        return p.parse_status(self.job_id, raw)

    def cancel(self) -> bool:
        """Ask the job to stop: a queued job ends ``cancelled`` at once and never reaches the
        upstream; a running one within about a second (its worker hears of it on the cancels
        channel and shuts the upstream connection down, even mid-stall, or wakes it from a
        backoff). False when it had ended already."""
        return p.cancel_result(self.job_id, self.client.store.cancel(self.job_id))

    def events(
        self, *, timeout: float | None = None, after: str = "0-0"
    ) -> Iterator[dict[str, Any]]:
        """Every event of the job in order, from the start (or after the stream id ``after``),
        following it live until the terminal event. ``timeout`` bounds the whole wait."""
        r = self.client.redis
        stream = self.client.keys.events(self.job_id)
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
            reply = r.xread({stream: last_id}, count=1000, block=block_ms)
            if not reply:
                if not checked_exists or not r.exists(self.client.keys.job(self.job_id)):
                    if not r.exists(self.client.keys.job(self.job_id), stream):
                        raise JobNotFound(self.job_id)
                    checked_exists = True
                continue
            for entry_id, fields in reply[0][1]:
                event = p.event_from_entry(entry_id, fields)
                last_id = event["stream_id"]
                if p.is_repeat(event, seen):
                    continue
                yield event
                if ev.is_terminal(event):
                    return

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The final message; raises JobFailed (or JobCancelled, JobExpired) or TimeoutError."""
        raw = self.client.store.job_hash(self.job_id)
        if raw is None and not self.client.redis.exists(self.client.keys.events(self.job_id)):
            raise JobNotFound(self.job_id)
        if raw and raw.get("state") == ev.COMPLETED:
            stored = self.client.redis.get(self.client.keys.result(self.job_id))
            if stored is not None:
                message: dict[str, Any] = orjson.loads(stored)
                return message
        for event in self.events(timeout=timeout):
            if ev.is_terminal(event):
                return p.outcome(self.job_id, event)
        raise JobNotFound(self.job_id)  # the stream expired under us
