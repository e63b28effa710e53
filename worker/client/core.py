"""What the sync and async clients share, free of I/O: checking submissions, building the
arguments of the submit script, reading a job hash and a terminal event.

:class:`worker.client.sync.Client` and :class:`worker.client.aio.AsyncClient` differ only in
how they talk to Redis; every decision is made here, once.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from worker import events as ev
from worker import metrics as m
from worker.broker import task_message
from worker.errors import JobCancelled, JobExpired, JobFailed, JobNotFound, RequestInvalid
from worker.keys import Keys
from worker.ratelimit.cost import submit_problem
from worker.request import validate_request
from worker.settings import Settings, load_settings
from worker.store import text

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")
MAX_METADATA_BYTES = 16_384
#: ``metadata["limit_key"]``, when given, is a rate-limit key: a non-blank string this long at
#: most (what the limiter accepts; see docs/rate-limits.md).
MAX_LIMIT_KEY_CHARS = 200
#: How long one blocking stream read waits before the reader checks that the job exists.
READ_BLOCK_MS = 1_000


def request_sha(request: Mapping[str, Any]) -> str:
    """The idempotency fingerprint of a validated request (key order does not matter)."""
    return hashlib.sha256(orjson.dumps(request, option=orjson.OPT_SORT_KEYS)).hexdigest()


def valid_job_id(job_id: Any) -> bool:
    return isinstance(job_id, str) and bool(JOB_ID_PATTERN.match(job_id))


def check_options(job_id: Any, metadata: Any, prefix: str = "") -> list[dict[str, str]]:
    """Problems with the job options beside a request (``job_id``, ``metadata``)."""
    errors = []
    if job_id is not None and not valid_job_id(job_id):
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
            if "limit_key" in metadata and not _valid_limit_key(metadata["limit_key"]):
                errors.append(
                    {
                        "loc": f"{prefix}metadata.limit_key",
                        "msg": f"must be a non-blank string of at most {MAX_LIMIT_KEY_CHARS} "
                        "characters",
                    }
                )
    return errors


def _valid_limit_key(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip()) and len(value) <= MAX_LIMIT_KEY_CHARS


def validate_one(settings: Settings, request: Any, loc_prefix: str = "") -> dict[str, Any]:
    """:func:`validate_request` with the settings' limits; error locations get ``loc_prefix``."""
    try:
        return validate_request(
            request,
            catalogue=settings.catalogue,
            max_request_bytes=settings.max_request_bytes,
        )
    except RequestInvalid as exc:
        if not loc_prefix:
            raise
        raise RequestInvalid(
            [{"loc": f"{loc_prefix}{e['loc']}", "msg": e["msg"]} for e in exc.errors]
        ) from None


def _rate_limit_problems(
    settings: Settings, request: Mapping[str, Any], metadata: Any, prefix: str
) -> list[dict[str, str]]:
    """A request that no wait could grant under the producer's own ``RATE_LIMITS``."""
    if not settings.rate_limits:
        return []
    meta = metadata if isinstance(metadata, Mapping) else None
    problem = submit_problem(settings.rate_limits, request, meta)
    if problem is None:
        return []
    field = "max_tokens" if problem.startswith("max_tokens") else "messages"
    return [{"loc": f"{prefix}{field}", "msg": problem}]


@dataclass(frozen=True, slots=True)
class Submission:
    """Validated jobs, ready to enqueue: one entry per job, ids final."""

    ids: list[str]
    requests: list[dict[str, Any]]
    metadata: list[Mapping[str, Any] | None]


def prepare_submission(
    settings: Settings,
    requests: Iterable[Mapping[str, Any]],
    job_ids: Sequence[str | None] | None,
    metadata: Sequence[Mapping[str, Any] | None] | Mapping[str, Any] | None,
) -> Submission:
    """Validate every request and option (one error lists every problem); mint missing ids."""
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
            validated.append(validate_one(settings, request, prefix))
        except RequestInvalid as exc:
            errors.extend(exc.errors)
        else:
            errors.extend(_rate_limit_problems(settings, validated[-1], meta, prefix))
        errors.extend(check_options(job_id, meta, prefix))
    if errors:
        raise RequestInvalid(errors)
    final_ids = [job_id or uuid.uuid4().hex for job_id in ids]
    if len(set(final_ids)) != len(final_ids):
        raise RequestInvalid([{"loc": "job_ids", "msg": "the same job_id appears twice"}])
    return Submission(final_ids, validated, metas)


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One job's call of ``submit.lua`` and the Celery message it carries."""

    job_id: str
    keys: list[str]
    args: list[Any]
    payload: dict[str, Any]
    message: bytes


def submit_calls(
    settings: Settings,
    keys: Keys,
    submission: Submission,
    *,
    now: float,
    same_redis: bool,
    batch_id: str | None = None,
) -> list[ScriptCall]:
    """The arguments of ``submit.lua`` for every job (see the script for their meaning).

    ``batch_id``: the gateway Message Batch the jobs belong to (their ends are counted there).
    """
    queued_ttl_s = int(settings.job_deadline_s + settings.result_ttl_s)
    calls = []
    for job_id, request, meta in zip(
        submission.ids, submission.requests, submission.metadata, strict=True
    ):
        # The message carries its deadline: a worker judges it even if the record is gone.
        deadline_at = now + settings.job_deadline_s
        payload = {
            "job_id": job_id,
            "request": request,
            "submitted_at": now,
            "deadline_at": deadline_at,
        }
        message = task_message(job_id, payload, queue=settings.queue)
        calls.append(
            ScriptCall(
                job_id=job_id,
                keys=[keys.job(job_id)] + ([settings.queue] if same_redis else []),
                args=[
                    request_sha(request),
                    now,
                    request["model"],
                    orjson.dumps(dict(meta or {})),
                    queued_ttl_s,
                    message if same_redis else "",
                    deadline_at,
                    batch_id or "",
                ],
                payload=payload,
                message=message,
            )
        )
    return calls


def created_flags(calls: list[ScriptCall], results: list[Any]) -> list[bool]:
    """Which script calls created their job; :class:`JobConflict` when an existing id holds
    a different request (the idempotency key was reused for something else)."""
    from worker.errors import JobConflict

    flags = []
    for call, result in zip(calls, results, strict=True):
        if int(result[0]) == 1:
            flags.append(True)
            continue
        existing = text(result[1])
        if existing != call.args[0]:
            raise JobConflict(call.job_id)
        flags.append(False)
    return flags


def count_by_model(models: Iterable[str]) -> dict[str, int]:
    """Jobs per model label (:func:`worker.metrics.model_label`): the Redis counter that
    workers export has no more fields than the metric has label values."""
    per_model: dict[str, int] = {}
    for model in models:
        label = m.model_label(model)
        per_model[label] = per_model.get(label, 0) + 1
    return per_model


def cancel_result(job_id: str, outcome: str) -> bool:
    """What ``Job.cancel`` answers for ``cancel.lua``'s outcome: True when the job was
    cancelled or asked to stop, False when it had ended; :class:`JobNotFound` when missing."""
    if outcome == "missing":
        raise JobNotFound(job_id)
    return outcome in {"cancelled", "requested"}


def parse_status(job_id: str, raw: Mapping[str, str]) -> dict[str, Any]:
    """A job hash as the API shows it: JSON fields decoded, numbers as numbers."""
    status: dict[str, Any] = {"job_id": job_id}
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


def event_from_entry(entry_id: Any, fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    """One stream entry as an event, with its ``stream_id`` (for resuming after it)."""
    event = ev.loads(fields[b"data"])
    event["stream_id"] = text(entry_id)
    return event


def outcome(job_id: str, event: dict[str, Any]) -> dict[str, Any]:
    """The final message of a terminal event, or the exception it stands for, raised."""
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


class SeqTracker:
    """The highest ``seq`` a reader has yielded (see :func:`is_repeat`)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = 0


def is_repeat(event: dict[str, Any], seen: SeqTracker) -> bool:
    """True for an event whose ``seq`` was already yielded: skip it.

    Writes retried after a lost connection can store an event twice (XADD is not idempotent);
    ``seq`` rises by one per event of a job, so a repeat is recognisable and dropped here.
    """
    seq = event.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        return False
    if seq <= seen.last:
        return True
    seen.last = seq
    return False


def client_settings(
    settings: Settings | None, *, redis_url: str | None, broker_url: str | None
) -> Settings:
    """A client's settings: the given ones (or the environment's), with explicit URLs on top."""
    overrides: dict[str, Any] = {}
    if redis_url is not None:
        overrides["redis_url"] = redis_url
    if broker_url is not None:
        overrides["broker_url"] = broker_url
    if settings is None:
        return load_settings(**overrides)
    if overrides:
        return load_settings(**{**dict(settings), **overrides})
    return settings
