"""The producer API: submit validated jobs, follow their events, read their results.

client = Client()                       # settings from the environment
job = client.submit(request)            # validated; nothing is written when invalid
for event in job.events(): ...          # replays from the start, ends at the terminal event
message = job.result(timeout=60)        # or JobFailed / JobCancelled / JobExpired / TimeoutError
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import orjson
import redis

from worker import events as ev
from worker import metrics as m
from worker.broker import is_redis_broker, task_message
from worker.errors import (
    JobCancelled,
    JobConflict,
    JobExpired,
    JobFailed,
    JobNotFound,
    RequestInvalid,
)
from worker.keys import Keys
from worker.request import validate_request
from worker.settings import Settings, load_settings
from worker.store import JobStore

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_METADATA_BYTES = 16_384
_READ_BLOCK_MS = 1_000


def request_sha(request: Mapping[str, Any]) -> str:
    """The idempotency fingerprint of a validated request (key order does not matter)."""
    return hashlib.sha256(orjson.dumps(request, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _check_options(job_id: Any, metadata: Any, prefix: str = "") -> list[dict[str, str]]:
    errors = []
    if job_id is not None and not (isinstance(job_id, str) and JOB_ID_PATTERN.match(job_id)):
        errors.append(
            {
                "loc": f"{prefix}job_id",
                "msg": "must be 1-128 characters of letters, digits, '_', '.', ':' or '-'",
            }
        )
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            errors.append({"loc": f"{prefix}metadata", "msg": "must be a JSON object"})
        else:
            try:
                size = len(orjson.dumps(dict(metadata)))
            except TypeError as exc:
                errors.append({"loc": f"{prefix}metadata", "msg": f"not JSON-serialisable: {exc}"})
            else:
                if size > MAX_METADATA_BYTES:
                    errors.append(
                        {
                            "loc": f"{prefix}metadata",
                            "msg": f"{size} bytes, over the limit of {MAX_METADATA_BYTES}",
                        }
                    )
    return errors


class Client:
    """Submits jobs and reads them back. Thread-safe; one per process is plenty."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        redis_url: str | None = None,
        broker_url: str | None = None,
    ) -> None:
        overrides: dict[str, Any] = {}
        if redis_url is not None:
            overrides["redis_url"] = redis_url
        if broker_url is not None:
            overrides["broker_url"] = broker_url
        if settings is None:
            settings = load_settings(**overrides)
        elif overrides:
            settings = load_settings(**{**dict(settings), **overrides})
        self.settings = settings
        self.keys = Keys(self.settings.key_prefix)
        self.redis = redis.Redis.from_url(str(self.settings.redis_url), socket_keepalive=True)
        self.store = JobStore(self.redis, self.keys, result_ttl_s=self.settings.result_ttl_s)
        broker = self.settings.effective_broker_url
        self._same_redis = broker == str(self.settings.redis_url)
        self._broker_redis = (
            None
            if self._same_redis or not is_redis_broker(broker)
            else redis.Redis.from_url(broker)
        )

    def close(self) -> None:
        self.redis.close()
        if self._broker_redis is not None:
            self._broker_redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submitting ----------------------------------------------------------------------

    def _validate(self, request: Any, loc_prefix: str = "") -> dict[str, Any]:
        try:
            return validate_request(
                request,
                allowed_models=self.settings.allowed_models,
                max_request_bytes=self.settings.max_request_bytes,
            )
        except RequestInvalid as exc:
            if not loc_prefix:
                raise
            raise RequestInvalid(
                [{"loc": f"{loc_prefix}{e['loc']}", "msg": e["msg"]} for e in exc.errors]
            ) from None

    def submit(
        self,
        request: Mapping[str, Any],
        *,
        job_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Job:
        """Validate and enqueue one job; an existing ``job_id`` with the same request returns
        that job, with a different request raises :class:`JobConflict`."""
        return self.submit_many([request], job_ids=[job_id], metadata=[metadata])[0]

    def submit_many(
        self,
        requests: Iterable[Mapping[str, Any]],
        *,
        job_ids: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | Mapping[str, Any] | None = None,
    ) -> list[Job]:
        """Validate every request first (one error lists every problem, nothing is written),
        then create and enqueue all of them in one pipeline."""
        items = list(requests)
        ids = list(job_ids) if job_ids is not None else [None] * len(items)
        metas = list(metadata) if isinstance(metadata, Sequence) else [metadata] * len(items)
        if len(ids) != len(items) or len(metas) != len(items):
            raise ValueError("job_ids and metadata must have one entry per request")
        single = len(items) == 1
        validated: list[dict[str, Any]] = []
        errors: list[dict[str, str]] = []
        for index, (request, job_id, meta) in enumerate(zip(items, ids, metas, strict=True)):
            prefix = "" if single else f"requests[{index}]."
            try:
                validated.append(self._validate(request, prefix))
            except RequestInvalid as exc:
                errors.extend(exc.errors)
            errors.extend(_check_options(job_id, meta, prefix))
        if errors:
            raise RequestInvalid(errors)
        final_ids = [job_id or uuid.uuid4().hex for job_id in ids]
        if len(set(final_ids)) != len(final_ids):
            raise RequestInvalid([{"loc": "job_ids", "msg": "the same job_id appears twice"}])
        return self._enqueue(final_ids, validated, metas)

    def _enqueue(
        self, ids: list[str], requests: list[dict[str, Any]], metas: list[Mapping[str, Any] | None]
    ) -> list[Job]:
        s = self.settings
        now = time.time()
        queued_ttl_s = int(s.job_deadline_s + s.result_ttl_s)
        script = self.store.submit_script()
        pipe = self.redis.pipeline(transaction=False)
        messages = []
        for job_id, request, meta in zip(ids, requests, metas, strict=True):
            payload = {"job_id": job_id, "request": request, "submitted_at": now}
            message = task_message(job_id, payload, queue=s.queue)
            messages.append((job_id, payload, message))
            keys = [self.keys.job(job_id)] + ([s.queue] if self._same_redis else [])
            script(
                keys=keys,
                client=pipe,
                args=[
                    request_sha(request),
                    now,
                    request["model"],
                    orjson.dumps(dict(meta or {})),
                    queued_ttl_s,
                    message if self._same_redis else "",
                    now + s.job_deadline_s,
                ],
            )
        results = pipe.execute()
        created = []
        for (job_id, payload, message), request, result in zip(
            messages, requests, results, strict=True
        ):
            if int(result[0]) == 1:
                created.append((job_id, payload, message))
                m.JOBS_SUBMITTED.labels(request["model"]).inc()
            elif result[1].decode() != request_sha(request):
                raise JobConflict(job_id)
        if created:
            self._count_submitted(
                [
                    request["model"]
                    for request, result in zip(requests, results, strict=True)
                    if int(result[0]) == 1
                ]
            )
        if created and not self._same_redis:
            self._send_elsewhere(created)
        return [Job(self, job_id) for job_id in ids]

    def _count_submitted(self, models: list[str]) -> None:
        """Add to the Redis counter that workers export (llm_worker_queue_jobs_submitted_total).

        A separate round trip after the jobs exist: a producer that dies between the two
        under-counts by its last batch, which is the safe side for a counter.
        """
        per_model: dict[str, int] = {}
        for model in models:
            per_model[model] = per_model.get(model, 0) + 1
        pipe = self.redis.pipeline(transaction=False)
        for model, count in per_model.items():
            pipe.hincrby(self.keys.submitted_counts(self.settings.queue), model, count)
        pipe.execute()

    def _send_elsewhere(self, created: list[tuple[str, dict[str, Any], bytes]]) -> None:
        """The broker is not the results Redis: a second pipeline, or Celery's own publish."""
        if self._broker_redis is not None:
            pipe = self._broker_redis.pipeline(transaction=False)
            for _job_id, _payload, message in created:
                pipe.lpush(self.settings.queue, message)
            pipe.execute()
            return
        from worker.celery_app import TASK_NAME, app

        if app.settings is None:
            app.use_settings(self.settings)
        for job_id, payload, _message in created:
            app.send_task(TASK_NAME, args=[payload], task_id=job_id, queue=self.settings.queue)

    # -- reading -------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """The handle of an existing job; :class:`JobNotFound` when there is none."""
        if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id):
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

    def status(self) -> dict[str, Any]:
        """The job hash: ``state``, ``attempts``, timestamps, ``model``, ``usage``, ``error``…"""
        raw = self.client.store.job_hash(self.job_id)
        if raw is None:
            raise JobNotFound(self.job_id)
        status: dict[str, Any] = {"job_id": self.job_id}
        for key, value in raw.items():
            if key in {"usage", "error", "metadata"}:
                status[key] = orjson.loads(value) if value else None
            elif key in {"attempts", "deliveries"}:
                status[key] = int(value)
            elif key.endswith("_at") and value:
                status[key] = float(value)
            else:
                status[key] = value
        return status

    def cancel(self) -> bool:
        """Ask the job to stop: a queued job ends ``cancelled`` at once and never reaches the
        upstream; a running one within about a second (its worker hears of it on the cancels
        channel and shuts the upstream connection down, even mid-stall, or wakes it from a
        backoff). False when it had ended already."""
        outcome = self.client.store.cancel(self.job_id)
        if outcome == "missing":
            raise JobNotFound(self.job_id)
        return outcome in {"cancelled", "requested"}

    def events(
        self, *, timeout: float | None = None, after: str = "0-0"
    ) -> Iterator[dict[str, Any]]:
        """Every event of the job in order, from the start (or after the stream id ``after``),
        following it live until the terminal event. ``timeout`` bounds the whole wait."""
        r = self.client.redis
        stream = self.client.keys.events(self.job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        last_id = after
        checked_exists = False
        while True:
            block_ms = _READ_BLOCK_MS
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
                last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                event = ev.loads(fields[b"data"])
                event["stream_id"] = last_id
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
                return _outcome(self.job_id, event)
        raise JobNotFound(self.job_id)  # the stream expired under us


def _outcome(job_id: str, event: dict[str, Any]) -> dict[str, Any]:
    kind = event["type"]
    if kind == ev.COMPLETED:
        message: dict[str, Any] = event["message"]
        return message
    error = event.get("error") or {"type": kind, "message": f"job {kind}", "status_code": None}
    if kind == ev.CANCELLED:
        raise JobCancelled(job_id, error)
    if kind == ev.EXPIRED:
        raise JobExpired(job_id, error)
    raise JobFailed(job_id, error)
